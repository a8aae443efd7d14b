//! The democratic election: attach to the live broker, or become it; take over when it dies.
//!
//! 1. Find the nearest live broker: the one `--broker` names, else every local candidate (the
//!    election address and its sibling ports) then the configured peers, pinged at once, the
//!    nearest answering first (see [`Candidates::rank`]). If one answers (another
//!    `ipc-mesh mcp` hosting a broker, or a dedicated `ipc-mesh broker`), attach: register the
//!    session's agent with its stored token and publish the link.
//! 2. If nobody answers, try to bind the election address. The operating system lets exactly one
//!    process bind it; the winner serves the broker in-process on `<home>/broker-<port>/`
//!    (the same data directory every earlier host used, so queued messages survive) and
//!    attaches to itself like everyone else. Losers wait a jittered moment and connect to it.
//! 3. Watch the connection. When it drops (the host exited or was killed: the kernel closes
//!    its sockets at once), mark the link detached, wait a jittered moment so the survivors
//!    do not all collide, and start again at step 1.
//! 4. On shutdown, stop the in-process broker, if any, so it flushes and releases the data
//!    directory; a survivor then takes over.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::session::{message_limit, Agent, Mesh};
use crate::client::{Candidates, Connection};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::protocol::{Body, Reply};

/// Longest jittered pause between attempts; keeps a take-over well within a second.
const MAX_JITTER: Duration = Duration::from_millis(250);
/// Pause after a failure that retrying at once would not fix (a refusing broker).
const SLOW_RETRY: Duration = Duration::from_secs(1);

/// The election task and the broker it may host.
pub struct Election {
    task: JoinHandle<()>,
    stop: CancellationToken,
    host: tokio::sync::watch::Receiver<Option<HostHandle>>,
}

#[derive(Clone)]
struct HostHandle {
    stop: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

impl Election {
    /// Starts the election task in the background; it never blocks the MCP handshake.
    ///
    /// With `candidates`, the nearest of them that answers is used; without, only the
    /// election address (`--broker` named it).
    pub fn start(mesh: Mesh, config: Config, candidates: Option<Candidates>) -> Election {
        let stop = CancellationToken::new();
        let (host_tx, host) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(run(mesh, config, candidates, stop.clone(), host_tx));
        Election { task, stop, host }
    }

    /// Stops electing and shuts the in-process broker down (flushing it), waiting at most
    /// `bound`.
    pub async fn shutdown(self, bound: Duration) {
        self.stop.cancel();
        self.task.abort();
        let host = self.host.borrow().clone();
        if let Some(h) = host {
            h.stop.cancel();
            let mut done = h.done;
            if tokio::time::timeout(bound, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!("the in-process broker did not stop in time");
            }
        }
    }
}

async fn run(
    mesh: Mesh,
    config: Config,
    candidates: Option<Candidates>,
    stop: CancellationToken,
    host_tx: tokio::sync::watch::Sender<Option<HostHandle>>,
) {
    let addr = mesh.addr().to_string();
    loop {
        if stop.is_cancelled() {
            return;
        }
        match nearest(&addr, candidates.as_ref()).await {
            Ok(conn) => {
                if !attach(&mesh, conn.clone()).await {
                    conn.close();
                    pause(SLOW_RETRY, &stop).await;
                    continue;
                }
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = stop.cancelled() => return,
                }
                tracing::info!(broker = %conn.addr(), "lost the broker; electing a new one");
                mesh.update(|l| {
                    l.gen += 1;
                    l.conn = None;
                    l.registered = false;
                });
                pause(jitter(), &stop).await;
            }
            Err(Error::Unreachable { reason, .. }) => {
                mesh.update(|l| l.problem = Some(format!("no broker at {addr}: {reason}")));
                let already_hosting = host_tx.borrow().as_ref().is_some_and(|h| !*h.done.borrow());
                if already_hosting {
                    // Our own broker is still starting (or stopping): give it a moment.
                    pause(jitter(), &stop).await;
                    continue;
                }
                match bind(&addr).await {
                    Ok(listener) => {
                        tracing::info!(listen = %addr, "no broker answered; serving as the broker");
                        let handle = host(listener, config.clone(), mesh.clone());
                        host_tx.send_replace(Some(handle));
                        // Connect to ourselves on the next turn, straight away.
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot bind the election address; retrying");
                        pause(jitter(), &stop).await;
                    }
                }
            }
            Err(e) => {
                // A broker answered but refused us (version mismatch, full): say so.
                tracing::warn!(error = %e, "the broker refused the connection");
                mesh.update(|l| l.problem = Some(e.to_string()));
                pause(SLOW_RETRY, &stop).await;
            }
        }
    }
}

/// Connects to the nearest broker that answers, or says that none does.
async fn nearest(addr: &str, candidates: Option<&Candidates>) -> Result<Connection, Error> {
    let Some(candidates) = candidates else {
        return Connection::connect(addr).await;
    };
    for (candidate, _rtt) in candidates.rank().await {
        match Connection::connect(&candidate).await {
            Ok(conn) => return Ok(conn),
            // Gone between the ping and now: try the next one.
            Err(e) => tracing::debug!(broker = %candidate, error = %e, "candidate vanished"),
        }
    }
    Err(Error::Unreachable {
        addr: candidates.all().join(", "),
        reason: "no broker answered".into(),
    })
}

/// Registers the session's agent on a fresh connection and publishes it. Returns false when
/// the connection failed before that finished (the caller starts over).
async fn attach(mesh: &Mesh, conn: Connection) -> bool {
    let link = mesh.link();
    let broker_id = conn.welcome().broker_id.clone();
    let mut agent = link.agent.clone();
    let mut wanted = link.wanted.clone();
    let mut problem = None;
    if let Some(a) = &agent {
        match reregister(mesh, &conn, a, link.renaming.as_ref()).await {
            Ok(a) => agent = Some(a),
            Err(Error::Disconnected) => return false,
            // Busy or briefly unavailable: start over in a moment rather than give up.
            Err(e) if e.kind().is_some_and(|k| k.is_retryable()) => return false,
            Err(e) => {
                // The session keeps its identity; tools say why it is not usable.
                problem = Some(format!("cannot register {} again: {e}", a.name));
            }
        }
    } else if let Some(name) = wanted.take() {
        match register_wanted(mesh, &conn, &name).await {
            Ok(a) => agent = Some(a),
            Err(Error::Disconnected) => return false,
            Err(e) if e.kind().is_some_and(|k| k.is_retryable()) => return false,
            Err(e) => problem = Some(format!("could not register as {name}: {e}")),
        }
    }
    let registered = problem.is_none();
    mesh.update(|l| {
        l.gen += 1;
        l.conn = Some(conn.clone());
        l.broker_id = broker_id;
        l.agent = agent;
        l.wanted = wanted;
        l.registered = registered || l.agent.is_none();
        l.problem = problem;
        l.max_message_bytes = message_limit(&conn);
    });
    true
}

/// Registers `agent` again with its token after a hand-over. When a rename was in flight, the
/// old name may already forward to the new one: then the new name is ours.
async fn reregister(
    mesh: &Mesh,
    conn: &Connection,
    agent: &Agent,
    renaming: Option<&federation::AgentName>,
) -> Result<Agent, Error> {
    let body = |name: &federation::AgentName| Body::Register {
        name: name.to_string(),
        token: Some(agent.token.clone()),
    };
    match conn.call(body(&agent.name)).await {
        Ok(_) => Ok(agent.clone()),
        Err(Error::Remote(w))
            if matches!(w.kind, ErrorKind::NameTaken | ErrorKind::BadToken)
                && renaming.is_some() =>
        {
            let new = renaming.expect("checked").clone();
            conn.call(body(&new)).await?;
            Ok(Agent {
                name: new,
                token: agent.token.clone(),
            })
        }
        Err(Error::Remote(w)) if w.kind == ErrorKind::TokenExpired => {
            // The broker's data no longer knows the name (reset, or another home): claim it
            // anew rather than leave the session unusable.
            tracing::warn!(agent = %agent.name, "token unknown to this broker; claiming the name anew");
            register_wanted(mesh, conn, &agent.name).await
        }
        Err(e) => Err(e),
    }
}

/// Registers `name` with the token stored in the home (or claims it and stores the token).
async fn register_wanted(
    mesh: &Mesh,
    conn: &Connection,
    name: &federation::AgentName,
) -> Result<Agent, Error> {
    let stored = mesh.home().load_token(name)?;
    let reply = conn
        .call(Body::Register {
            name: name.to_string(),
            token: stored.clone(),
        })
        .await;
    let reply = match reply {
        // A token file left from a broker whose data is gone: claim the name anew.
        Err(Error::Remote(w)) if w.kind == ErrorKind::TokenExpired && stored.is_some() => {
            conn.call(Body::Register {
                name: name.to_string(),
                token: None,
            })
            .await?
        }
        other => other?,
    };
    match reply {
        Reply::Registered { token, .. } => {
            mesh.home().store_token(name, &token)?;
            Ok(Agent {
                name: name.clone(),
                token,
            })
        }
        other => Err(Error::Remote(crate::error::WireError::internal(format!(
            "unexpected reply to register: {other:?}"
        )))),
    }
}

/// Serves the broker in-process on `listener` until stopped.
fn host(listener: TcpListener, mut config: Config, mesh: Mesh) -> HostHandle {
    let stop = CancellationToken::new();
    let (done_tx, done) = tokio::sync::watch::channel(false);
    if let Ok(a) = listener.local_addr() {
        config.broker.listen = a;
    }
    let home = mesh.home().clone();
    let shutdown = stop.clone();
    mesh.update(|l| l.hosting = true);
    tokio::spawn(async move {
        let result =
            crate::broker::server::serve_on(listener, config, &home, shutdown.cancelled_owned())
                .await;
        if let Err(e) = result {
            // Typically the previous host is still flushing and holds the data directory:
            // our listener is gone now, so the next round of the election retries.
            tracing::warn!(error = %e, "the in-process broker stopped");
            mesh.update(|l| l.problem = Some(format!("cannot serve as the broker: {e}")));
            // Let another survivor win meanwhile instead of spinning on bind-and-fail.
            tokio::time::sleep(jitter()).await;
        }
        mesh.update(|l| l.hosting = false);
        let _ = done_tx.send(true);
    });
    HostHandle { stop, done }
}

/// Binds the election address. Only loopback and local addresses can be bound; anything else
/// simply keeps this process a client.
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn jitter() -> Duration {
    MAX_JITTER.mul_f64(rand::random_range(0.2..1.0))
}

async fn pause(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use federation::AgentName;
    use tokio::time::Instant;

    use super::*;
    use crate::home::Home;
    use crate::protocol::Reply;

    const BOUND: Duration = Duration::from_secs(10);

    fn free_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn session(home: &Home, addr: &str, name: &str) -> Mesh {
        Mesh::new(
            home.clone(),
            addr.to_string(),
            Some(AgentName::new(name).unwrap()),
        )
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + BOUND;
        while !f() {
            assert!(Instant::now() < deadline, "{what} within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_hosts_second_attaches_and_takes_over_when_the_host_stops() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("home"));
        let addr = free_addr();
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let mut config = Config::default();
        // Keep the in-process brokers to themselves: no sibling discovery on 9876 and up.
        config.mesh.sibling_ports = (port, port);

        let a = session(&home, &addr, "a");
        let election_a = Election::start(a.clone(), config.clone(), None);
        a.ready(true, Instant::now() + BOUND).await.unwrap();
        assert!(a.link().hosting, "the first session hosts the broker");

        let b = session(&home, &addr, "b");
        let election_b = Election::start(b.clone(), config.clone(), None);
        let link = b.ready(true, Instant::now() + BOUND).await.unwrap();
        assert!(!link.hosting, "the second session attaches");
        let broker_id = link.broker_id.clone();

        // A message queued for a while the first session hosts.
        let sent = b
            .call(
                Body::Send(crate::protocol::Outgoing {
                    to: "a".into(),
                    content: "kept".into(),
                    dedup_key: Some("k1".into()),
                    ..Default::default()
                }),
                true,
            )
            .await
            .unwrap();
        assert!(matches!(sent, Reply::Sent { .. }), "{sent:?}");

        // The host stops: the survivor becomes the broker, on the same data directory.
        election_a.shutdown(Duration::from_secs(2)).await;
        until("b hosts", || b.link().hosting).await;
        let link = b.ready(true, Instant::now() + BOUND).await.unwrap();
        assert_eq!(
            link.broker_id, broker_id,
            "same data directory, same broker id"
        );
        let a_token = home.load_token(&AgentName::new("a").unwrap()).unwrap();
        assert!(a_token.is_some(), "a's token was stored");

        // a comes back and finds its message.
        let a2 = session(&home, &addr, "a");
        let election_a2 = Election::start(a2.clone(), config, None);
        let fetched = a2
            .call(
                Body::Fetch {
                    include_read: false,
                    limit: 10,
                    mark_read: false,
                },
                true,
            )
            .await
            .unwrap();
        let Reply::Messages { messages, .. } = fetched else {
            panic!("{fetched:?}")
        };
        assert_eq!(
            messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>(),
            ["kept"]
        );
        assert!(!a2.link().hosting);
        election_a2.shutdown(Duration::from_secs(2)).await;
        election_b.shutdown(Duration::from_secs(2)).await;
    }
}
