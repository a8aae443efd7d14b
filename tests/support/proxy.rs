//! A fault-injecting TCP proxy for tests: forwards to a target, and can cut every connection
//! (now and until healed), refuse connections from given source IPs, hold one direction of the
//! connections from an IP (a one-way cut: bytes wait, as TCP would keep retransmitting them),
//! delay every chunk it forwards, and record every byte it forwards (per connection and
//! direction, once `record` is called), as an eavesdropper on the wire would see them.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the dialer to the target.
    Up,
    /// From the target back to the dialer.
    Down,
}

struct State {
    cut: AtomicBool,
    stop: AtomicBool,
    delay_ms: AtomicU64,
    blocked: Mutex<HashSet<IpAddr>>,
    held: Mutex<HashSet<(IpAddr, Dir)>>,
    open: Mutex<Vec<Conn>>,
    recording: AtomicBool,
    /// Per connection, in accept order: the bytes forwarded up and down.
    tapes: Mutex<Vec<Arc<Tape>>>,
}

/// What one connection carried while recording.
#[derive(Default)]
pub struct Tape {
    up: Mutex<Vec<u8>>,
    down: Mutex<Vec<u8>>,
}

impl Tape {
    fn push(&self, dir: Dir, bytes: &[u8]) {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
        .lock()
        .unwrap()
        .extend_from_slice(bytes);
    }
}

struct Conn {
    from: IpAddr,
    a: TcpStream,
    b: TcpStream,
}

impl State {
    fn is_held(&self, from: IpAddr, dir: Dir) -> bool {
        self.held.lock().unwrap().contains(&(from, dir))
    }
}

impl Proxy {
    /// Listens on `listen_ip` (a free port) and forwards to `target`.
    pub fn start(listen_ip: &str, target: &str) -> Proxy {
        let l = TcpListener::bind((listen_ip, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            blocked: Mutex::new(HashSet::new()),
            held: Mutex::new(HashSet::new()),
            open: Mutex::new(Vec::new()),
            recording: AtomicBool::new(false),
            tapes: Mutex::new(Vec::new()),
        });
        let (st, target) = (state.clone(), target.to_string());
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, from)) => {
                        let refused = st.cut.load(Ordering::SeqCst)
                            || st.blocked.lock().unwrap().contains(&from.ip());
                        if refused {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(&target) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        client.set_nonblocking(false).unwrap();
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        st.open.lock().unwrap().push(Conn {
                            from: from.ip(),
                            a: client.try_clone().unwrap(),
                            b: server.try_clone().unwrap(),
                        });
                        let tape = st.recording.load(Ordering::SeqCst).then(|| {
                            let t = Arc::new(Tape::default());
                            st.tapes.lock().unwrap().push(t.clone());
                            t
                        });
                        pipe(
                            st.clone(),
                            from.ip(),
                            Dir::Up,
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            tape.clone(),
                        );
                        pipe(st.clone(), from.ip(), Dir::Down, server, client, tape);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, state }
    }

    /// Drops every connection through the proxy and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.drop_connections(|_| true);
    }

    /// Drops every connection now (mid-frame, likely), without refusing new ones.
    pub fn reset(&self) {
        self.drop_connections(|_| true);
    }

    /// Drops the connections coming from `ip` now, without refusing new ones.
    pub fn reset_from(&self, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.drop_connections(|c| c.from == ip);
    }

    /// Undoes `cut`, `block_from` and `hold_from`; keeps the delay.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.blocked.lock().unwrap().clear();
        self.state.held.lock().unwrap().clear();
    }

    /// Refuses (and drops) connections coming from `ip`.
    pub fn block_from(&self, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.state.blocked.lock().unwrap().insert(ip);
        self.drop_connections(|c| c.from == ip);
    }

    /// Holds the bytes flowing `dir` on connections from `ip` (existing and new) until healed.
    pub fn hold_from(&self, ip: &str, dir: Dir) {
        let ip: IpAddr = ip.parse().unwrap();
        self.state.held.lock().unwrap().insert((ip, dir));
    }

    /// Delays every chunk forwarded, in both directions.
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Records every byte of the connections accepted from now on.
    pub fn record(&self) {
        self.state.recording.store(true, Ordering::SeqCst);
    }

    /// What each recorded connection carried so far, in accept order: (up, down).
    pub fn recordings(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.state
            .tapes
            .lock()
            .unwrap()
            .iter()
            .map(|t| (t.up.lock().unwrap().clone(), t.down.lock().unwrap().clone()))
            .collect()
    }

    /// Every byte recorded, all connections and both directions.
    pub fn recorded(&self) -> Vec<u8> {
        self.recordings()
            .into_iter()
            .flat_map(|(up, down)| up.into_iter().chain(down))
            .collect()
    }

    fn drop_connections(&self, which: impl Fn(&Conn) -> bool) {
        self.state.open.lock().unwrap().retain(|c| {
            if which(c) {
                let _ = c.a.shutdown(Shutdown::Both);
                let _ = c.b.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(
    st: Arc<State>,
    from_ip: IpAddr,
    dir: Dir,
    mut from: TcpStream,
    mut to: TcpStream,
    tape: Option<Arc<Tape>>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        loop {
            // A held direction stops reading: the sender's TCP buffers fill, as on a black hole.
            while st.is_held(from_ip, dir) && !st.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(t) = &tape {
                        t.push(dir, &buf[..n]);
                    }
                    let delay = st.delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        std::thread::sleep(Duration::from_millis(delay));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
