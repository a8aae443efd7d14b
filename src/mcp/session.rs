//! The MCP server's attachment to the mesh: one shared handle that every tool call uses.
//!
//! 1. [`Mesh`] holds a [`Link`] in a `watch` channel: the current broker [`Connection`] (or
//!    none during a hand-over), the agent this session acts as, and whether that connection
//!    is registered for it. Only the election task (see [`super::election`]) replaces the
//!    connection; it bumps `gen` each time.
//! 2. A tool call waits for a usable link ([`Mesh::ready`]), bounded by [`HANDOVER_WAIT`], then
//!    sends its request on a clone of the connection. Connections are pipelined, so a `wait`
//!    blocking for 50 s never holds up a `send`.
//! 3. If the connection drops with the request in flight, a request that is safe to repeat
//!    (see [`crate::client::retry_safe`]; every `send` carries a dedup key) waits for the next
//!    link and goes again; any other request reports that its outcome is unknown.
//! 4. `register` and `rename` change who the session is. They are serialised by one lock and
//!    apply their result only to the connection generation they ran on, so a hand-over in
//!    between can never leave the session registered under a name the link does not know.

use std::sync::Arc;
use std::time::Duration;

use federation::AgentName;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::client::{retry_safe, Connection};
use crate::connection::FRAME_OVERHEAD;
use crate::error::{Error, ErrorKind, WireError};
use crate::home::Home;
use crate::protocol::{Body, Reply};

/// How long a tool call waits for a broker (at start-up, or while the survivors of a broker
/// host elect a new one) and for the session's registration, before it gives up.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The agent a session acts as, and the token that proves it.
#[derive(Clone, Debug)]
pub struct Agent {
    pub name: AgentName,
    pub token: String,
}

/// The session's view of the mesh at one moment.
#[derive(Clone, Default)]
pub struct Link {
    /// Bumped whenever `conn` changes (attached, lost, replaced).
    pub gen: u64,
    pub conn: Option<Connection>,
    pub broker_id: String,
    /// The agent this session acts as, once a registration succeeded.
    pub agent: Option<Agent>,
    /// `conn` is registered as `agent` (always true when `agent` is none).
    pub registered: bool,
    /// `--agent`: a name to register as soon as a broker answers.
    pub wanted: Option<AgentName>,
    /// A rename in flight: if the connection drops mid-way, re-registration tries this name too.
    pub renaming: Option<AgentName>,
    /// This process serves the broker in-process.
    pub hosting: bool,
    /// Why the session is not usable, in a sentence for the model (cleared on success).
    pub problem: Option<String>,
    /// The largest message the broker accepts, in bytes.
    pub max_message_bytes: usize,
}

impl Link {
    /// Attached, and done registering whatever it had to.
    fn settled(&self) -> bool {
        self.attached() && self.wanted.is_none() && (self.agent.is_none() || self.registered)
    }

    /// Attached, but the broker refused to take the session's agent back: waiting will not
    /// help until the broker changes.
    fn stuck(&self) -> bool {
        self.attached() && self.agent.is_some() && !self.registered && self.problem.is_some()
    }

    fn attached(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_closed())
    }
}

/// Why a tool call could not be served; each becomes an `isError` result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The broker said no; its message says what to do.
    #[error("{0}")]
    Refused(WireError),
    /// No broker (or no registration) within [`HANDOVER_WAIT`].
    #[error("{0}")]
    Unavailable(String),
    /// The session has no agent yet.
    #[error("{0}")]
    NotRegistered(String),
    /// The connection dropped with a request in flight that cannot safely be repeated.
    #[error("{0}")]
    Uncertain(String),
}

impl CallError {
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            CallError::Refused(w) => Some(w.kind),
            _ => None,
        }
    }
}

/// The shared handle: cheap to clone, used by every tool call and the election task.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    home: Home,
    addr: String,
    link: watch::Sender<Link>,
    /// Serialises `register` and `rename`: they read and change who the session is.
    identity: Mutex<()>,
}

impl Mesh {
    pub fn new(home: Home, addr: String, wanted: Option<AgentName>) -> Mesh {
        let link = Link {
            wanted,
            ..Link::default()
        };
        Mesh {
            inner: Arc::new(Inner {
                home,
                addr,
                link: watch::Sender::new(link),
                identity: Mutex::new(()),
            }),
        }
    }

    pub fn home(&self) -> &Home {
        &self.inner.home
    }

    /// The election address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    pub fn link(&self) -> Link {
        self.inner.link.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Link> {
        self.inner.link.subscribe()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Link)) {
        self.inner.link.send_modify(f);
    }

    /// The agent name this session acts as, if any.
    pub fn agent_name(&self) -> Option<AgentName> {
        self.inner
            .link
            .borrow()
            .agent
            .as_ref()
            .map(|a| a.name.clone())
    }

    /// Waits until the link is attached and registration has settled, up to `deadline`; with
    /// `need_agent`, also requires that the session is registered.
    pub async fn ready(&self, need_agent: bool, deadline: Instant) -> Result<Link, CallError> {
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout_at(deadline, rx.wait_for(|l| l.settled() || l.stuck()))
            .await
            .ok()
            .and_then(|r| r.ok().map(|l| l.clone()));
        let Some(link) = waited else {
            return Err(self.unavailable(&self.link()));
        };
        if link.stuck() {
            return Err(CallError::Unavailable(format!(
                "{}; restart the assistant's ipc-mesh server, or ask the mesh's operator",
                link.problem
                    .as_deref()
                    .unwrap_or("the broker refused this session")
            )));
        }
        if need_agent && link.agent.is_none() {
            // A register call may be under way (a client may send the next tool call before
            // its answer): wait for it, within the same bound, before refusing.
            if tokio::time::timeout_at(deadline, self.inner.identity.lock())
                .await
                .is_ok()
            {
                let now = self.link();
                if now.agent.is_some() && now.settled() {
                    return Ok(now);
                }
            }
            return Err(CallError::NotRegistered(not_registered_text(&link)));
        }
        Ok(link)
    }

    fn unavailable(&self, link: &Link) -> CallError {
        let why = link.problem.clone().unwrap_or_else(|| "no answer".into());
        if link.conn.is_some() {
            CallError::Unavailable(format!(
                "the session is still registering ({why}); try again in a few seconds"
            ))
        } else {
            CallError::Unavailable(format!(
                "no broker answered at {} for {} s ({why}); the mesh may be electing a new broker. Try again in a few seconds",
                self.addr(),
                HANDOVER_WAIT.as_secs()
            ))
        }
    }

    /// Waits until the connection of generation `gen` has been replaced.
    async fn replaced(&self, gen: u64, deadline: Instant) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout_at(deadline, rx.wait_for(|l| l.gen != gen)).await;
    }

    /// One request for this session, riding out a hand-over if it is safe to repeat.
    pub async fn call(&self, body: Body, need_agent: bool) -> Result<Reply, CallError> {
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            let link = self.ready(need_agent, deadline).await?;
            let conn = link.conn.expect("settled links have a connection");
            match conn.call(body.clone()).await {
                Ok(reply) => return Ok(reply),
                Err(Error::Remote(w)) => return Err(CallError::Refused(w)),
                Err(Error::Disconnected) if retry_safe(&body) => {
                    tracing::debug!("connection lost mid-request; waiting for the next broker");
                    self.replaced(link.gen, deadline).await;
                }
                Err(Error::Disconnected) => {
                    return Err(CallError::Uncertain(
                        "the connection to the broker dropped while this request was in flight, so it may or may not have taken effect. Check (e.g. with list_instances or check) before repeating it".into(),
                    ))
                }
                Err(e) => return Err(CallError::Unavailable(e.to_string())),
            }
        }
    }

    /// One attempt on the current link, without riding out a hand-over: for callers (the
    /// `wait` tool, the push pump) that must recompute their request after a reconnect.
    pub async fn call_once(&self, link: &Link, body: Body) -> Result<Reply, Error> {
        match &link.conn {
            Some(conn) => conn.call(body).await,
            None => Err(Error::Disconnected),
        }
    }

    /// The unread count of the session's agent (none when unregistered), for results of
    /// tools whose reply does not carry it.
    pub async fn unread(&self) -> Option<u64> {
        self.agent_name()?;
        let body = Body::Fetch {
            include_read: false,
            limit: 1,
            mark_read: false,
        };
        match self.call(body, true).await {
            Ok(Reply::Messages { unread, .. }) => Some(unread),
            _ => None,
        }
    }

    /// The largest message the current broker accepts.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.link.borrow().max_message_bytes
    }

    /// `register`: makes `name` this session's identity, with its stored token if there is one.
    pub async fn register(&self, name: AgentName) -> Result<Registered, CallError> {
        let _one_at_a_time = self.inner.identity.lock().await;
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            let link = self.ready(false, deadline).await?;
            if let Some(current) = &link.agent {
                if current.name != name {
                    return Err(CallError::Refused(WireError::invalid(format!(
                        "this session is already registered as {}; use rename to change your name",
                        current.name
                    ))));
                }
            }
            let conn = link.conn.clone().expect("settled links have a connection");
            let token = self
                .home()
                .load_token(&name)
                .map_err(|e| CallError::Unavailable(format!("cannot read the token file: {e}")))?;
            let body = Body::Register {
                name: name.to_string(),
                token,
            };
            match conn.call(body).await {
                Ok(Reply::Registered {
                    token,
                    broker_id,
                    created,
                    unread,
                    ..
                }) => {
                    self.home().store_token(&name, &token).map_err(|e| {
                        CallError::Unavailable(format!("cannot store the token: {e}"))
                    })?;
                    let agent = Agent {
                        name: name.clone(),
                        token,
                    };
                    let applied = self.inner.link.send_if_modified(|l| {
                        if l.gen != link.gen {
                            return false;
                        }
                        l.agent = Some(agent);
                        l.registered = true;
                        l.problem = None;
                        true
                    });
                    if applied {
                        return Ok(Registered {
                            name,
                            broker_id,
                            created,
                            unread,
                        });
                    }
                    // The broker changed under us; register again on the new connection.
                }
                Ok(other) => return Err(unexpected(other)),
                Err(Error::Remote(w)) => return Err(CallError::Refused(w)),
                Err(Error::Disconnected) => self.replaced(link.gen, deadline).await,
                Err(e) => return Err(CallError::Unavailable(e.to_string())),
            }
        }
    }

    /// `rename`: renames this session's agent; its token stays the same.
    pub async fn rename(&self, new: AgentName) -> Result<Renamed, CallError> {
        let _one_at_a_time = self.inner.identity.lock().await;
        // Not ready(true): that waits for a registration under way, which is us holding the
        // identity lock.
        let link = self.ready(false, Instant::now() + HANDOVER_WAIT).await?;
        let Some(agent) = link.agent.clone() else {
            return Err(CallError::NotRegistered(not_registered_text(&link)));
        };
        self.update(|l| l.renaming = Some(new.clone()));
        let conn = link.conn.clone().expect("settled links have a connection");
        let result = conn
            .call(Body::Rename {
                new_name: new.to_string(),
            })
            .await;
        let outcome = match result {
            Ok(Reply::Renamed { unread, .. }) => {
                self.adopt_name(&agent, &new)?;
                Ok(Renamed {
                    old: agent.name.clone(),
                    new: new.clone(),
                    unread,
                })
            }
            Ok(other) => Err(unexpected(other)),
            Err(Error::Remote(w)) => Err(CallError::Refused(w)),
            Err(Error::Disconnected) => {
                // Whether the rename happened shows in which name re-registration succeeds
                // with (the election task tries both).
                let link = self.ready(true, Instant::now() + HANDOVER_WAIT).await?;
                match link.agent {
                    Some(a) if a.name == new => {
                        self.adopt_name(&agent, &new)?;
                        Ok(Renamed {
                            old: agent.name.clone(),
                            new: new.clone(),
                            unread: self.unread().await.unwrap_or(0),
                        })
                    }
                    _ => Err(CallError::Uncertain(format!(
                        "the connection dropped during the rename and you are still {}; call rename again",
                        agent.name
                    ))),
                }
            }
            Err(e) => Err(CallError::Unavailable(e.to_string())),
        };
        self.update(|l| l.renaming = None);
        outcome
    }

    /// Moves the token file to the new name and makes it the session's identity.
    fn adopt_name(&self, old: &Agent, new: &AgentName) -> Result<(), CallError> {
        let store = |e: Error| CallError::Unavailable(format!("cannot store the token: {e}"));
        self.home().store_token(new, &old.token).map_err(store)?;
        self.home().remove_token(&old.name).map_err(store)?;
        self.update(|l| {
            if let Some(a) = &mut l.agent {
                a.name = new.clone();
            }
        });
        Ok(())
    }
}

/// What `register` reports.
pub struct Registered {
    pub name: AgentName,
    pub broker_id: String,
    pub created: bool,
    pub unread: u64,
}

/// What `rename` reports.
pub struct Renamed {
    pub old: AgentName,
    pub new: AgentName,
    pub unread: u64,
}

fn not_registered_text(link: &Link) -> String {
    let mut s = String::from(
        "you are not registered yet: call register with the name you want (instance_id), then retry",
    );
    if let Some(p) = &link.problem {
        s.push_str(&format!(" (the automatic registration failed: {p})"));
    }
    s
}

fn unexpected(reply: Reply) -> CallError {
    CallError::Refused(WireError::internal(format!(
        "unexpected reply from the broker: {reply:?}"
    )))
}

/// The largest message a broker accepts, from what it says its largest frame is.
pub fn message_limit(conn: &Connection) -> usize {
    (conn.welcome().max_frame_bytes as usize).saturating_sub(FRAME_OVERHEAD)
}
