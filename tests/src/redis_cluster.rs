//! A real Redis Cluster on loopback for the rate-limit tests: `masters`
//! primaries with one replica each (`redis-server --cluster-enabled yes`,
//! joined by `redis-cli --cluster create`), a short node timeout so a
//! killed primary's replica takes over within seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ports::free_port;
use crate::process::ManagedProcess;

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    pub port: u16,
    process: Option<ManagedProcess>,
    dir: PathBuf,
}

/// A running cluster; every node is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<Node>,
}

/// Milliseconds before a silent primary is failed over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().context("running redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Node {
    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            // A replica may take over however long since it last heard
            // from its primary (the drill kills primaries on purpose).
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(&self.dir);
        let mut p = ManagedProcess::spawn("redis-cluster-node", cmd, &self.dir.join("redis.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if !p.is_running() || Instant::now() > deadline {
                bail!("redis cluster node did not start:\n{}", p.log_contents());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(p);
        Ok(())
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs a command on this node with redis-cli.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args)
    }

    /// This node's role (`master` or `slave`) as it reports it.
    pub fn role(&self) -> String {
        self.cli(&["ROLE"]).unwrap_or_default().lines().next().unwrap_or_default().trim().to_string()
    }
}

impl RedisCluster {
    /// Starts `masters` primaries and as many replicas under `dir` and joins
    /// them; returns once every node reports `cluster_state:ok`.
    pub fn start(dir: &Path, masters: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..masters * 2 {
            let node_dir = dir.join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut node = Node { port: free_port(), process: None, dir: node_dir };
            node.spawn()?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&addrs).args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!("redis-cli --cluster create failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(30))?;
        cluster.wait_replicas_synced(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every running node sees the cluster as ok.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.process.is_some())
                .all(|n| n.cli(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok")));
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster is not ok after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running replica's link to its primary is up.
    pub fn wait_replicas_synced(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let synced = self
                .nodes
                .iter()
                .filter(|n| n.process.is_some() && n.role() == "slave")
                .all(|n| n.cli(&["INFO", "replication"]).is_ok_and(|i| i.contains("master_link_status:up")));
            if synced {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("replicas not in sync after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Seed URLs, comma-separated (what `REDIS_URL` takes).
    pub fn redis_url(&self) -> String {
        self.nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
    }

    /// The index of the primary that serves `key` now.
    pub fn primary_for(&self, key: &str) -> Result<usize> {
        let any = self.nodes.iter().find(|n| n.process.is_some()).context("no node runs")?;
        let slot: u16 = any.cli(&["CLUSTER", "KEYSLOT", key])?.trim().parse().context("CLUSTER KEYSLOT")?;
        // CLUSTER NODES: <id> <ip:port@cport> <flags> <master> ... <slots…>
        let nodes = any.cli(&["CLUSTER", "NODES"])?;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else { continue };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let serves = f.iter().skip(8).any(|r| match r.split_once('-') {
                Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b),
                None => r.parse::<u16>().is_ok_and(|s| s == slot),
            });
            if serves {
                let port: u16 = addr.split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).context("node address")?;
                return self.nodes.iter().position(|n| n.port == port).context("a primary outside the harness");
            }
        }
        bail!("no primary serves slot {slot}")
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        match self.nodes.get_mut(i).and_then(|n| n.process.take()) {
            Some(mut p) => p.kill(),
            None => Ok(()),
        }
    }

    /// Starts node `i` again with its cluster configuration (it rejoins as a
    /// replica of whoever took its slots).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes.get_mut(i).context("no such node")?.spawn()
    }

    /// `SCRIPT FLUSH` on every running node.
    pub fn flush_scripts(&self) -> Result<()> {
        for n in self.nodes.iter().filter(|n| n.process.is_some()) {
            n.cli(&["SCRIPT", "FLUSH"])?;
        }
        Ok(())
    }

    /// Keys held by each running primary.
    pub fn keys_per_primary(&self) -> Vec<(u16, u64)> {
        self.nodes
            .iter()
            .filter(|n| n.process.is_some() && n.role() == "master")
            .map(|n| (n.port, n.cli(&["DBSIZE"]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)))
            .collect()
    }
}
