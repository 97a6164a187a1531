//! Accepting gRPC connections so that no client can stop others from
//! connecting: peers of another uid are dropped before any byte is read; at
//! most [`MAX_GRPC_CONNECTIONS`] are held, and when all are taken an idle
//! one is closed (those that never sent a request first, then the one idle
//! longest); accept errors (out of file descriptors and the
//! like) are retried with a backoff and never end the loop. And the open
//! file limit is raised at start, so the common soft limit of 1,024 does
//! not bind when the hard limit is higher.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use keyholder_agent::slots::{AcceptBackoff, InFlight, Slot, SlotHandle, Slots};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::codegen::http;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// Most simultaneous gRPC connections. With the agent's 256 this stays well
/// under an open file limit of 1,024; under a lower limit both take less
/// (`capacity_within_fd_limit`).
pub const MAX_GRPC_CONNECTIONS: usize = 512;

/// Activity is recorded at most this often per connection.
const TOUCH_EVERY: Duration = Duration::from_millis(250);

/// Raises the soft open file limit to the hard limit; returns both (soft
/// after raising, hard).
pub fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open file limit");
        }
    }
    let now = getrlimit(Resource::Nofile);
    (now.current, now.maximum)
}

/// The gRPC connections accepted on `listener`, for
/// `serve_with_incoming_shutdown`. The accept task ends when the server
/// drops the stream.
pub fn grpc_incoming(
    listener: UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Counted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let own_uid = rustix::process::getuid().as_raw();
        let slots = Slots::new(keyholder_agent::slots::capacity_within_fd_limit(
            MAX_GRPC_CONNECTIONS,
            66,
        ));
        tracing::debug!(connections = slots.capacity(), "gRPC connection slots");
        let mut backoff = AcceptBackoff::new("grpc");
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => {
                    backoff.accepted();
                    s
                }
                Err(e) => {
                    backoff.failed(&e, &slots).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own_uid => {}
                Ok(cred) => {
                    tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused connection from another uid");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::escape::Escaped(&e), "refused connection without peer credentials");
                    continue;
                }
            }
            // Requests in flight are marked per connection by
            // `InFlightLayer`; of the others, those that never sent a
            // request give way first, then the one idle longest.
            let Some(slot) = slots.admit() else {
                continue;
            };
            let counted = Counted::new(stream, slot, true);
            if tx.send(Ok(counted)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection holding its slot; evicted, it reads as closed.
pub struct Counted<S = UnixStream> {
    stream: S,
    slot: Slot,
    touched: Instant,
    /// Bytes read, up to [`PROVEN_AFTER`]; `None` when the connection is
    /// marked proven by its owner instead (the TCP listener, after the TLS
    /// handshake: a ClientHello alone proves nothing).
    read: Option<usize>,
}

/// A client that sent more than the HTTP/2 preface (24 bytes) and a frame
/// header (9) has made a request; it is evicted after those that did not.
const PROVEN_AFTER: usize = 33;

impl<S> Counted<S> {
    /// `stream` in `slot`; with `prove_by_reading`, proven once it has read
    /// more than a request's first bytes.
    pub fn new(stream: S, slot: Slot, prove_by_reading: bool) -> Self {
        Self {
            stream,
            slot,
            touched: Instant::now(),
            read: prove_by_reading.then_some(0),
        }
    }

    /// The connection's slot.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    fn touch(&mut self) {
        if self.touched.elapsed() >= TOUCH_EVERY {
            self.touched = Instant::now();
            self.slot.touch();
        }
    }

    fn count_read(&mut self, n: usize) {
        if let Some(read) = self.read.as_mut()
            && *read <= PROVEN_AFTER
        {
            *read = read.saturating_add(n);
            if *read > PROVEN_AFTER {
                self.slot.proven();
            }
        }
        self.touch();
    }
}

fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed to make room for a new one",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.slot.poll_evicted(cx).is_ready() {
            // End of stream: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if matches!(read, Poll::Ready(Ok(()))) && n > 0 {
            this.count_read(n);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.slot.is_evicted() {
            return Poll::Ready(Err(evicted()));
        }
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.slot.is_evicted() {
            return Poll::Ready(Err(evicted()));
        }
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What a gRPC request knows of its connection: the peer's credentials,
/// and the slot that marks requests in flight.
#[derive(Clone)]
pub struct GrpcConnectInfo {
    /// Peer credentials and address.
    pub uds: UdsConnectInfo,
    /// The connection's slot.
    pub slot: SlotHandle,
    /// Who is calling, read from `/proc` when the connection was accepted
    /// and kept for its requests.
    pub caller: std::sync::Arc<std::sync::OnceLock<crate::gate::Caller>>,
}

impl Connected for Counted {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let uds = self.stream.connect_info();
        // Read at accept (this runs once per connection), as close to the
        // connect as the server gets, and kept for its requests.
        let caller = std::sync::OnceLock::new();
        if let Some(cred) = uds.peer_cred {
            let _ = caller.set(crate::gate::Caller::from_peer(
                cred.uid(),
                cred.pid(),
                crate::gate::Channel::Grpc,
            ));
        }
        GrpcConnectInfo {
            uds,
            slot: self.slot.handle(),
            caller: std::sync::Arc::new(caller),
        }
    }
}

/// Keeps a connection with a request in flight (a call being served, or a
/// response still streaming, `Status.Watch` for one) from being evicted:
/// only connections with nothing in flight make room for new ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService(inner)
    }
}

/// See [`InFlightLayer`].
#[derive(Clone, Debug)]
pub struct InFlightService<S>(S);

type Answer = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for InFlightService<S>
where
    S: tower::Service<http::Request<B>, Response = Answer>,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Answer, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let in_flight = request
            .extensions()
            .get::<GrpcConnectInfo>()
            .map(|info| info.slot.begin())
            .or_else(|| {
                request
                    .extensions()
                    .get::<crate::remote::TcpConnectInfo>()
                    .map(|info| info.slot.begin())
            });
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // The request stays in flight until its response body is done
            // (or dropped): a stream counts for as long as it runs.
            Ok(match in_flight {
                Some(in_flight) => response.map(|body| {
                    tonic::body::Body::new(UntilDone {
                        body,
                        _in_flight: in_flight,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that holds its request's [`InFlight`] mark.
struct UntilDone {
    body: tonic::body::Body,
    _in_flight: InFlight,
}

impl tonic::codegen::Body for UntilDone {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        tonic::codegen::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        tonic::codegen::Body::size_hint(&self.body)
    }
}
