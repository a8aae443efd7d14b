//! How a broker reaches its peers: a dialer trait, with real TCP and an in-memory twin.
//!
//! Accepting is not part of the trait: a broker's one listener takes clients and peers alike
//! and hands peer connections to the driver (`driver::Handle::accept`). The in-memory network
//! has its own listeners. [`Cuttable`] wraps any dialer so a test can cut links between two
//! brokers (refusing dials and killing open streams) whichever transport runs underneath.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Any byte stream a link can run over.
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerStream for T {}

pub type BoxStream = Box<dyn PeerStream>;
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Opens connections to peers.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, addr: &str) -> DialFuture;
}

/// Real TCP.
pub struct TcpDialer {
    pub timeout: Duration,
    /// The local address outgoing links come from (the broker's listen IP), so firewalls and
    /// peers see one address per broker.
    pub bind: Option<std::net::IpAddr>,
}

impl Default for TcpDialer {
    fn default() -> Self {
        TcpDialer {
            timeout: Duration::from_secs(3),
            bind: None,
        }
    }
}

async fn connect(addr: &str, bind: Option<std::net::IpAddr>) -> io::Result<tokio::net::TcpStream> {
    let Some(ip) = bind else {
        return tokio::net::TcpStream::connect(addr).await;
    };
    let target = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == ip.is_ipv4())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address of the right family"))?;
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

impl Dialer for TcpDialer {
    fn dial(&self, addr: &str) -> DialFuture {
        let (addr, timeout, bind) = (addr.to_string(), self.timeout, self.bind);
        Box::pin(async move {
            let s = tokio::time::timeout(timeout, connect(&addr, bind))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as BoxStream)
        })
    }
}

/// Where a listener of the in-memory network receives its connections (and who dialed).
type Acceptor = mpsc::Sender<(BoxStream, String)>;

/// An in-memory network: listeners by address, connections as in-process pipes.
#[derive(Clone, Default)]
pub struct MemNetwork {
    listeners: Arc<Mutex<std::collections::HashMap<String, Acceptor>>>,
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts listening on `addr`; accepted streams arrive with the dialer's address.
    pub fn listen(&self, addr: &str) -> mpsc::Receiver<(BoxStream, String)> {
        let (tx, rx) = mpsc::channel(64);
        self.listeners.lock().unwrap().insert(addr.to_string(), tx);
        rx
    }

    pub fn unlisten(&self, addr: &str) {
        self.listeners.lock().unwrap().remove(addr);
    }

    /// A dialer whose connections come from `from`.
    pub fn dialer(&self, from: &str) -> MemDialer {
        MemDialer {
            net: self.clone(),
            from: from.to_string(),
        }
    }
}

pub struct MemDialer {
    net: MemNetwork,
    from: String,
}

impl Dialer for MemDialer {
    fn dial(&self, addr: &str) -> DialFuture {
        let listener = self.net.listeners.lock().unwrap().get(addr).cloned();
        let from = self.from.clone();
        Box::pin(async move {
            let tx = listener.ok_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionRefused, "nothing listens there")
            })?;
            let (a, b) = tokio::io::duplex(256 * 1024);
            tx.send((Box::new(b) as BoxStream, from))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "listener gone"))?;
            Ok(Box::new(a) as BoxStream)
        })
    }
}

/// Wraps a dialer so that links from `from` to given addresses can be cut.
pub struct Cuttable<D> {
    inner: D,
    from: String,
    cuts: Cuts,
}

/// The cut links of a test network, shared by every [`Cuttable`] in it.
#[derive(Clone, Default)]
pub struct Cuts {
    inner: Arc<Mutex<CutsInner>>,
}

#[derive(Default)]
struct CutsInner {
    cut: HashSet<(String, String)>,
    streams: Vec<(String, String, CancellationToken)>,
}

impl Cuts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts both directions between `a` and `b`: open streams die, new dials fail.
    pub fn cut(&self, a: &str, b: &str) {
        let mut g = self.inner.lock().unwrap();
        g.cut.insert((a.to_string(), b.to_string()));
        g.cut.insert((b.to_string(), a.to_string()));
        g.streams.retain(|(x, y, token)| {
            let hit = (x == a && y == b) || (x == b && y == a);
            if hit {
                token.cancel();
            }
            !hit
        });
    }

    pub fn heal(&self) {
        self.inner.lock().unwrap().cut.clear();
    }

    pub fn wrap<D: Dialer>(&self, from: &str, inner: D) -> Cuttable<D> {
        Cuttable {
            inner,
            from: from.to_string(),
            cuts: self.clone(),
        }
    }

    fn is_cut(&self, a: &str, b: &str) -> bool {
        self.inner
            .lock()
            .unwrap()
            .cut
            .contains(&(a.to_string(), b.to_string()))
    }
}

impl<D: Dialer> Dialer for Cuttable<D> {
    fn dial(&self, addr: &str) -> DialFuture {
        if self.cuts.is_cut(&self.from, addr) {
            return Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "link cut by the test",
                ))
            });
        }
        let (cuts, from, to) = (self.cuts.clone(), self.from.clone(), addr.to_string());
        let fut = self.inner.dial(addr);
        Box::pin(async move {
            let s = fut.await?;
            let token = CancellationToken::new();
            cuts.inner
                .lock()
                .unwrap()
                .streams
                .push((from, to, token.clone()));
            let cancelled = Box::pin(token.clone().cancelled_owned());
            Ok(Box::new(CutStream {
                inner: s,
                token,
                cancelled,
            }) as BoxStream)
        })
    }
}

/// A stream that fails as soon as its link is cut.
struct CutStream {
    inner: BoxStream,
    token: CancellationToken,
    /// Kept across polls so a cut wakes a reader that is waiting for data.
    cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "link cut by the test")
}

impl AsyncRead for CutStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.token.is_cancelled() {
            return Poll::Ready(Err(cut_error()));
        }
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.token.is_cancelled() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
