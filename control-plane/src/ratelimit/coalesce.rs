//! Write coalescing for the gRPC listener, where Envoy's rate-limit calls
//! arrive (DESIGN §14: RLS ≥ 20 000 decisions/s on a 2-core machine).
//!
//! hyper answers each HTTP/2 stream from its own task, which wakes the
//! connection task once its response is queued; tokio runs a task woken that
//! way next, so the connection wrote almost every answer with a system call
//! of its own (about 0.8 per decision in `rls-bench`), and the client woke up
//! for each. [`Coalescing`] buffers what the connection writes and lets a
//! flush yield once: the connection task goes to the back of the run queue,
//! the answers that become ready in the meantime join the buffer, and the
//! next flush writes them all at once. The yield waits for no timer, only
//! for tasks that are already runnable; `TCP_NODELAY` stays on. When a yield
//! gathers nothing (a lone call), the next [`SKIP_AFTER_LONE_YIELD`] flushes
//! write at once, so a quiet connection keeps its latency.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Past this many buffered bytes a write first sends the buffer.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// Flushes that write at once after a yield that no other answer joined.
/// A lone caller pays for a yield once in this many + 1 answers, not on
/// every one (measured with one call in flight: p50 +30–60 µs when every
/// flush yields, within noise with 8); under load a yield is still tried
/// after every 8 writes that did not, and kept while answers join it.
pub const SKIP_AFTER_LONE_YIELD: u32 = 8;

/// A TCP stream whose writes wait in a buffer for a flush, and whose flush
/// yields once to the other runnable tasks before it writes.
#[derive(Debug)]
pub struct Coalescing {
    inner: TcpStream,
    buf: Vec<u8>,
    /// Bytes at the start of `buf` already written to the socket.
    written: usize,
    flush: Flush,
    /// Flushes left that write without yielding (after a yield in which no
    /// other answer joined).
    skip: u32,
}

/// Where the flush of what is buffered stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Idle,
    /// Yielded once, with this many bytes buffered.
    Yielded(usize),
    Draining,
}

impl Coalescing {
    pub fn new(inner: TcpStream) -> Self {
        Self { inner, buf: Vec::with_capacity(4096), written: 0, flush: Flush::Idle, skip: 0 }
    }

    /// Writes the whole buffer to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.buf.get(self.written..).filter(|r| !r.is_empty()) {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room before buffering more.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Coalescing {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Coalescing {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written < this.buf.len() {
            match this.flush {
                Flush::Idle if this.skip == 0 => {
                    // Waking itself puts this task at the back of the run
                    // queue: answers completing before it runs again join
                    // this write.
                    this.flush = Flush::Yielded(this.buf.len());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Flush::Idle => this.skip -= 1,
                Flush::Yielded(len) if len == this.buf.len() => this.skip = SKIP_AFTER_LONE_YIELD,
                Flush::Yielded(_) | Flush::Draining => {}
            }
            this.flush = Flush::Draining;
            ready!(this.poll_drain(cx))?;
        }
        this.flush = Flush::Idle;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Connected for Coalescing {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    /// Counts how often it is woken.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A coalescing server side and a plain client side of one connection.
    async fn pair() -> io::Result<(Coalescing, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        Ok((Coalescing::new(server), client))
    }

    /// Buffers `data`, which must be taken whole at once.
    fn write(c: &mut Coalescing, cx: &mut Context<'_>, data: &[u8]) -> io::Result<()> {
        match Pin::new(c).poll_write(cx, data) {
            Poll::Ready(Ok(n)) if n == data.len() => Ok(()),
            other => Err(io::Error::other(format!("write of {} bytes: {other:?}", data.len()))),
        }
    }

    fn flushed(c: &mut Coalescing, cx: &mut Context<'_>) -> bool {
        matches!(Pin::new(c).poll_flush(cx), Poll::Ready(Ok(())))
    }

    /// Whatever the client can read within `wait` (or until end of stream).
    async fn received(client: &TcpStream, wait: Duration) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(ready) = tokio::time::timeout_at(deadline, client.readable()).await {
            ready?;
            let mut buf = [0u8; 16 * 1024];
            match client.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend(buf.iter().take(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn writes_wait_for_a_flush_that_yields_once_then_sends_them_together() -> io::Result<()> {
        let (mut server, client) = pair().await?;
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let quiet = Duration::from_millis(100);

        write(&mut server, &mut cx, b"first ")?;
        let vectored = [IoSlice::new(b"second "), IoSlice::new(b"third")];
        assert!(matches!(Pin::new(&mut server).poll_write_vectored(&mut cx, &vectored), Poll::Ready(Ok(12))));
        assert!(received(&client, quiet).await?.is_empty(), "nothing is sent before a flush");

        assert!(!flushed(&mut server, &mut cx), "the first flush yields");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "and wakes its task to come back");
        write(&mut server, &mut cx, b" fourth")?;
        assert!(received(&client, quiet).await?.is_empty());

        assert!(flushed(&mut server, &mut cx), "the second flush writes");
        assert_eq!(received(&client, quiet).await?, b"first second third fourth");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        assert!(flushed(&mut server, &mut cx), "nothing buffered: no yield");
        write(&mut server, &mut cx, b"again")?;
        assert!(!flushed(&mut server, &mut cx), "the next batch yields once too");
        assert!(flushed(&mut server, &mut cx));
        assert_eq!(received(&client, quiet).await?, b"again");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[tokio::test]
    async fn after_a_yield_nothing_joined_the_next_flushes_write_at_once() -> io::Result<()> {
        let (mut server, client) = pair().await?;
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let quiet = Duration::from_millis(50);

        // A lone answer: the yield gathers nothing.
        write(&mut server, &mut cx, b"lone")?;
        assert!(!flushed(&mut server, &mut cx));
        assert!(flushed(&mut server, &mut cx));
        assert_eq!(received(&client, quiet).await?, b"lone");
        for i in 0..SKIP_AFTER_LONE_YIELD {
            write(&mut server, &mut cx, format!("answer {i}").as_bytes())?;
            assert!(flushed(&mut server, &mut cx), "flush {i} after a lone yield writes at once");
            assert_eq!(received(&client, quiet).await?, format!("answer {i}").as_bytes());
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        // Then a yield is tried again, and kept while answers join it.
        for round in 2..5 {
            write(&mut server, &mut cx, b"one ")?;
            assert!(!flushed(&mut server, &mut cx), "round {round} yields");
            write(&mut server, &mut cx, b"two")?;
            assert!(flushed(&mut server, &mut cx));
            assert_eq!(received(&client, quiet).await?, b"one two");
            assert_eq!(wakes.0.load(Ordering::SeqCst), round);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_full_buffer_is_sent_before_more_is_taken_and_shutdown_sends_the_rest() -> io::Result<()> {
        let (mut server, client) = pair().await?;
        let waker = Waker::from(Arc::new(Wakes::default()));
        let mut cx = Context::from_waker(&waker);
        let big = vec![7u8; MAX_BUFFERED];
        write(&mut server, &mut cx, &big)?;
        write(&mut server, &mut cx, b"tail")?;
        let got = received(&client, Duration::from_millis(200)).await?;
        assert!(got == big, "the full buffer went out without a flush ({} bytes); the tail waits", got.len());

        assert!(matches!(Pin::new(&mut server).poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(received(&client, Duration::from_millis(200)).await?, b"tail");
        Ok(())
    }
}
