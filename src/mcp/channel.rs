//! Push: new messages as `notifications/claude/channel`, for clients that take them.
//!
//! 1. The adapter starts [`pump`] once the client has initialized and either announced the
//!    experimental `claude/channel` capability or the user forced it (`--channel always`).
//! 2. The pump long-polls the broker for unread messages of the session's agent (waiting, as
//!    long as it takes, for the session to register and for any hand-over to finish).
//! 3. Each message is pushed through [`Push`]; only the ones the client accepted are then
//!    marked read, exactly as `wait` would. A message is therefore shown once, either pushed
//!    or returned by `check`/`wait`, and never lost if the push fails.
//! 4. The pump stops when a push fails (the client is gone) or the session shuts down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::session::Mesh;
use crate::error::Error;
use crate::protocol::{Body, MessageView, Reply};

/// One long-poll of the pump; well under the broker's 50 s cap so shutdown is never slow.
const POLL: Duration = Duration::from_secs(25);
/// Messages pushed per poll; the rest come on the next turn.
const BATCH: u32 = 50;
/// Pushed ids remembered to avoid pushing one twice.
const RECENT: usize = 1024;
/// Pause after an unexpected broker error, so a persistent one does not spin.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What the pump hands to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelEvent {
    pub content: String,
    /// Claude Code keeps only keys of `[A-Za-z0-9_]` with string values.
    pub meta: BTreeMap<String, String>,
}

impl ChannelEvent {
    pub fn from_message(m: &MessageView) -> ChannelEvent {
        let mut meta = BTreeMap::new();
        meta.insert("message_id".into(), m.id.clone());
        meta.insert("from".into(), m.from.clone());
        meta.insert("to".into(), m.to.clone());
        meta.insert("sent_at".into(), m.sent_at.clone());
        meta.insert("kind".into(), m.kind.clone());
        if let Some(r) = &m.reply_to {
            meta.insert("reply_to".into(), r.clone());
        }
        if let Some(d) = &m.data {
            meta.insert("data".into(), d.clone());
        }
        ChannelEvent {
            content: m.content.clone(),
            meta,
        }
    }
}

/// The client end of a push: resolves to whether the notification was written.
pub trait Push: Send + Sync + 'static {
    fn push(&self, event: ChannelEvent) -> BoxFuture<'static, bool>;
}

/// Pushes the session's new messages until a push fails or `stop` is cancelled.
pub async fn pump(mesh: Mesh, push: Arc<dyn Push>, stop: CancellationToken) {
    tokio::select! {
        _ = run(mesh, push) => {}
        _ = stop.cancelled() => {}
    }
}

async fn run(mesh: Mesh, push: Arc<dyn Push>) {
    let mut rx = mesh.subscribe();
    // Ids pushed lately, so a message whose read mark failed is not pushed twice. Bounded:
    // the oldest id is forgotten first.
    let mut recent: VecDeque<String> = VecDeque::with_capacity(RECENT);
    loop {
        // Registered and attached: nothing to push for until then.
        let link = match rx
            .wait_for(|l| l.agent.is_some() && l.registered && l.conn.is_some())
            .await
        {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        let body = Body::Wait {
            timeout_ms: POLL.as_millis() as u64,
            limit: BATCH,
            mark_read: false,
        };
        let messages = match mesh.call_once(&link, body).await {
            Ok(Reply::Messages { messages, .. }) => messages,
            Err(Error::Disconnected) => {
                let gen = link.gen;
                let _ = rx.wait_for(|l| l.gen != gen).await;
                continue;
            }
            Ok(_) | Err(_) => {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let mut pushed = Vec::new();
        let mut alive = true;
        for m in messages.iter().filter(|m| !m.read) {
            if recent.contains(&m.id) {
                pushed.push(m.id.clone());
                continue;
            }
            if !push.push(ChannelEvent::from_message(m)).await {
                tracing::debug!("channel push failed; the client is gone");
                alive = false;
                break;
            }
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(m.id.clone());
            pushed.push(m.id.clone());
        }
        let acked = ack(&mesh, pushed).await;
        if !alive {
            return;
        }
        if !acked {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
}

/// Marks pushed messages read; false if that failed (they stay unread, and `check` shows
/// them again).
async fn ack(mesh: &Mesh, ids: Vec<String>) -> bool {
    if ids.is_empty() {
        return true;
    }
    match mesh.call(Body::Ack { ids }, true).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not mark pushed messages read");
            false
        }
    }
}
