//! A fault-injecting TCP proxy for tests: forwards to a target, and can cut every connection
//! (now and until healed), or refuse connections from given source IPs.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

struct State {
    cut: AtomicBool,
    stop: AtomicBool,
    blocked: Mutex<HashSet<IpAddr>>,
    open: Mutex<Vec<(IpAddr, TcpStream, TcpStream)>>,
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
            blocked: Mutex::new(HashSet::new()),
            open: Mutex::new(Vec::new()),
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
                        st.open.lock().unwrap().push((
                            from.ip(),
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                        ));
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
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
        for (_, a, b) in self.state.open.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Refuses (and drops) connections coming from `ip`.
    pub fn block_from(&self, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.state.blocked.lock().unwrap().insert(ip);
        self.state.open.lock().unwrap().retain(|(from, a, b)| {
            if *from == ip {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
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

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
