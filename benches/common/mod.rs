//! Shared by the benchmarks: a gRPC channel to the daemon and latency sets.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// A gRPC channel over the daemon's Unix socket.
pub async fn connect(socket: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://keyholderd.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect")
}

/// Latencies of one measured run.
pub struct Run {
    pub ops: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Run {
    pub fn new(latencies: Vec<Duration>, elapsed: Duration) -> Self {
        let mut latencies = latencies;
        latencies.sort();
        Self {
            ops: latencies.len(),
            elapsed,
            latencies,
        }
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile in milliseconds.
    pub fn pct(&self, p: f64) -> f64 {
        let l = &self.latencies;
        l[(((l.len() as f64 - 1.0) * p).round() as usize).min(l.len() - 1)].as_secs_f64() * 1e3
    }

    /// Mean latency in milliseconds.
    pub fn mean(&self) -> f64 {
        self.latencies.iter().sum::<Duration>().as_secs_f64() * 1e3 / self.ops as f64
    }
}
