//! A trivially fast upstream for benchmarks: answers every request with a
//! small JSON body, so what is measured is Envoy and the filter.

use std::net::SocketAddr;

use anyhow::Result;

/// Starts the upstream on a free loopback port; it runs until the process ends.
pub async fn start() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async {
        ([("content-type", "application/json")], r#"{"id":"bench","name":"bench-project"}"#)
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}
