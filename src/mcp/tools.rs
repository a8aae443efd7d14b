//! The nine tools: what `tools/list` shows, how arguments are checked, and what each returns.
//!
//! 1. [`specs`] is the static list, in its fixed order, with a plain JSON Schema for the input
//!    and an `outputSchema` for the `structuredContent` of every successful result.
//! 2. [`call`] checks the arguments against the schema by hand (rmcp does not validate on
//!    stdio): a wrong type, a missing or unknown property is [`ToolCallError::InvalidArguments`],
//!    which the adapter turns into a JSON-RPC error; so is an unknown tool.
//! 3. The tool then runs through the session ([`Mesh`]), which waits out a broker hand-over.
//!    A failure the model can act on becomes [`ToolOutcome::Failed`] (`isError: true`) with a
//!    sentence saying what to do next.
//! 4. Every success carries text for the model plus `structuredContent` with the caller's
//!    `unread` count (null only while the session has no agent).

use std::sync::OnceLock;
use std::time::Duration;

use federation::AgentName;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::session::{CallError, Mesh, HANDOVER_WAIT};
use crate::config::defaults;
use crate::error::{Error, ErrorKind};
use crate::protocol::{Body, MessageView, Outgoing, Reply, Route};

/// Static description of one tool.
pub struct ToolSpec {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub input_schema: Value,
    pub output_schema: Value,
}

/// The result of a tool that ran.
#[derive(Debug)]
pub enum ToolOutcome {
    /// Text for the model, and the structured value matching the tool's `outputSchema`.
    Done { text: String, structured: Value },
    /// A failure the model can act on: `isError: true` with this sentence.
    Failed { text: String },
}

/// Misuse of the protocol: becomes a JSON-RPC error (invalid params).
#[derive(Debug, thiserror::Error)]
pub enum ToolCallError {
    #[error("Unknown tool: {0}")]
    UnknownTool(String),
    #[error("{0}")]
    InvalidArguments(String),
}

/// Messages returned by one `check` when the caller sets no limit.
const CHECK_DEFAULT_LIMIT: u64 = 20;
/// How long `wait` blocks when the caller does not say.
const WAIT_DEFAULT_SECS: f64 = 30.0;

/// The tools, in the order `tools/list` shows them.
pub fn specs() -> &'static [ToolSpec] {
    static SPECS: OnceLock<Vec<ToolSpec>> = OnceLock::new();
    SPECS.get_or_init(build_specs)
}

fn message_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "Message id; pass it as reply_to to answer"},
            "from": {"type": "string"},
            "to": {"type": "string"},
            "sent_at": {"type": "string", "description": "RFC 3339, UTC"},
            "content": {"type": "string"},
            "data": {"type": ["object", "null"]},
            "reply_to": {"type": ["string", "null"]}
        },
        "required": ["id", "from", "to", "sent_at", "content", "data", "reply_to"]
    })
}

fn unread_schema(nullable: bool) -> Value {
    if nullable {
        json!({"type": ["integer", "null"], "minimum": 0,
               "description": "Your unread messages; null until you register"})
    } else {
        json!({"type": "integer", "minimum": 0, "description": "Your unread messages"})
    }
}

fn name_schema(description: &str) -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": 32,
        "pattern": "^[A-Za-z0-9_-]{1,32}$",
        "description": description
    })
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false
    })
}

/// Like [`object`], but other properties are allowed.
fn open_object(properties: Value, required: &[&str]) -> Value {
    let mut o = object(properties, required);
    o["additionalProperties"] = Value::Bool(true);
    o
}

fn build_specs() -> Vec<ToolSpec> {
    let route = json!({"type": "string", "enum": ["local", "forwarded", "held", "remote"],
        "description": "local: in the recipient's inbox on this broker; forwarded: the name was renamed; held: kept for an agent not yet registered; remote: queued for the recipient's broker elsewhere in the mesh"});
    vec![
        ToolSpec {
            name: "register",
            title: "Register on the mesh",
            description: "Join the ipc-mesh under a name so other AI assistants can message you. Call this once at the start of a session unless you are already registered (mesh_status shows it). The name stays yours across restarts. Afterwards use check or wait to receive messages: they are not shown to you otherwise.",
            input_schema: object(
                json!({"instance_id": name_schema("The name to register as: 1-32 letters, digits, '-' or '_' (e.g. claude-backend)")}),
                &["instance_id"],
            ),
            output_schema: object(
                json!({
                    "name": {"type": "string"},
                    "broker": {"type": "string", "description": "Id of the broker you are attached to"},
                    "created": {"type": "boolean", "description": "True when the name was new"},
                    "unread": unread_schema(false)
                }),
                &["name", "broker", "created", "unread"],
            ),
        },
        ToolSpec {
            name: "send",
            title: "Send a message",
            description: "Send a message to another agent on the mesh by name. Use it to hand off work, ask a question or answer one (set reply_to to the id of the message you answer). Delivery is durable: the recipient gets it the next time it calls check or wait, even if it is offline now. Names you do not know are refused with the closest known names; set hold to keep a message for an agent that has not registered yet.",
            input_schema: object(
                json!({
                    "to_id": {"type": "string", "minLength": 1, "description": "Recipient: an agent name, or name@broker-id"},
                    "content": {"type": "string", "description": "The message text"},
                    "data": {"type": "object", "description": "Optional structured payload (a JSON object)"},
                    "reply_to": {"type": "string", "description": "Id of the message this answers"},
                    "hold": {"type": "boolean", "description": "Keep the message for a recipient that has never registered (default false)"}
                }),
                &["to_id", "content"],
            ),
            output_schema: object(
                json!({
                    "id": {"type": "string", "description": "The message id"},
                    "to": {"type": "string", "description": "The agent it was delivered to"},
                    "route": route.clone(),
                    "unread": unread_schema(false)
                }),
                &["id", "to", "route", "unread"],
            ),
        },
        ToolSpec {
            name: "broadcast",
            title: "Broadcast a message",
            description: "Send one message to every other agent on the mesh. Use it for announcements that concern everyone (\"I am refactoring the API, hold off on changes\"); for a single agent use send. Recipients read it with check or wait.",
            input_schema: object(
                json!({
                    "content": {"type": "string", "description": "The message text"},
                    "data": {"type": "object", "description": "Optional structured payload (a JSON object)"}
                }),
                &["content"],
            ),
            output_schema: object(
                json!({
                    "id": {"type": "string"},
                    "reached": {"type": "integer", "minimum": 0, "description": "How many agents got it"},
                    "skipped": {"type": "array", "items": object(
                        json!({"name": {"type": "string"}, "reason": {"type": "string"}}),
                        &["name", "reason"])},
                    "unread": unread_schema(false)
                }),
                &["id", "reached", "skipped", "unread"],
            ),
        },
        ToolSpec {
            name: "check",
            title: "Check messages",
            description: "Read your new messages from other agents and mark them read. This (or wait) is the only way messages reach you: call it when you start, between steps of a longer task, and whenever a result says you have unread messages. Returns at once; to block until something arrives, use wait.",
            input_schema: object(
                json!({
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "Most messages to return (default 20); the rest stay unread"},
                    "include_read": {"type": "boolean", "description": "Also return messages already read (default false)"}
                }),
                &[],
            ),
            output_schema: object(
                json!({
                    "messages": {"type": "array", "items": message_schema()},
                    "unread": unread_schema(false)
                }),
                &["messages", "unread"],
            ),
        },
        ToolSpec {
            name: "wait",
            title: "Wait for a message",
            description: "Block until a message arrives for you (or the timeout passes), then return it and mark it read. Use it when you are waiting for another agent's answer instead of calling check repeatedly. The timeout is at most 50 seconds so the call never hits a client's tool timeout; call it again to keep waiting.",
            input_schema: object(
                json!({
                    "timeout_secs": {"type": "number", "minimum": 0, "maximum": 50, "description": "Seconds to wait at most (default 30, at most 50)"}
                }),
                &[],
            ),
            output_schema: object(
                json!({
                    "messages": {"type": "array", "items": message_schema()},
                    "timed_out": {"type": "boolean", "description": "True when nothing arrived in time"},
                    "unread": unread_schema(false)
                }),
                &["messages", "timed_out", "unread"],
            ),
        },
        ToolSpec {
            name: "list_instances",
            title: "List agents",
            description: "List the agents on the mesh: their names, the broker they are attached to, whether they are online and when they were last seen. Use it to find the right name before send, or to see who is around.",
            input_schema: object(json!({}), &[]),
            output_schema: object(
                json!({
                    "agents": {"type": "array", "items": object(json!({
                        "name": {"type": "string"},
                        "broker": {"type": "string"},
                        "online": {"type": "boolean"},
                        "last_seen": {"type": "string"}
                    }), &["name", "broker", "online", "last_seen"])},
                    "you": {"type": ["string", "null"], "description": "Your name, if registered"},
                    "unread": unread_schema(true)
                }),
                &["agents", "you", "unread"],
            ),
        },
        ToolSpec {
            name: "rename",
            title: "Rename yourself",
            description: "Change your own name on the mesh. Other agents get a notice, and messages sent to your old name still reach you for a while. You can only rename yourself.",
            input_schema: object(
                json!({"new_id": name_schema("Your new name: 1-32 letters, digits, '-' or '_'")}),
                &["new_id"],
            ),
            output_schema: object(
                json!({
                    "old": {"type": "string"},
                    "new": {"type": "string"},
                    "unread": unread_schema(false)
                }),
                &["old", "new", "unread"],
            ),
        },
        ToolSpec {
            name: "share_file",
            title: "Share a text file",
            description: "Send the contents of a text file on this machine to another agent, as a message (with an optional description). Only regular UTF-8 text files up to the broker's message size limit (256 KiB by default) can be shared; relative paths are resolved against the directory the assistant was started in. The recipient reads it with check or wait.",
            input_schema: object(
                json!({
                    "to_id": {"type": "string", "minLength": 1, "description": "Recipient agent name"},
                    "filepath": {"type": "string", "minLength": 1, "description": "Path of the file to send"},
                    "description": {"type": "string", "description": "What the file is and why you send it"}
                }),
                &["to_id", "filepath"],
            ),
            output_schema: object(
                json!({
                    "id": {"type": "string"},
                    "to": {"type": "string"},
                    "route": route,
                    "file": object(json!({
                        "path": {"type": "string"},
                        "name": {"type": "string"},
                        "bytes": {"type": "integer", "minimum": 0}
                    }), &["path", "name", "bytes"]),
                    "unread": unread_schema(false)
                }),
                &["id", "to", "route", "file", "unread"],
            ),
        },
        ToolSpec {
            name: "mesh_status",
            title: "Mesh status",
            description: "Show the state of the mesh and of this session: which broker you are attached to (and whether this assistant's process is hosting it), its peers, the agents, delivery counters, your name and unread count. Use it to diagnose delivery problems or to check whether you are registered.",
            input_schema: object(json!({}), &[]),
            // Open: the broker's status grows with the mesh (links, outboxes), and a client
            // that validates must not reject a newer broker's extra fields.
            output_schema: open_object(
                json!({
                    "session": object(json!({
                        "name": {"type": ["string", "null"]},
                        "broker_addr": {"type": "string"},
                        "hosting": {"type": "boolean", "description": "This process serves the broker"}
                    }), &["name", "broker_addr", "hosting"]),
                    "broker": {"type": "object"},
                    "peers": {"type": "array"},
                    "agents": {"type": "array"},
                    "clock": {"type": "array"},
                    "counters": {"type": "object"},
                    "unread": unread_schema(true)
                }),
                &["session", "broker", "peers", "agents", "clock", "counters", "unread"],
            ),
        },
    ]
}

/// Runs tool `name` for the session.
pub async fn call(
    mesh: &Mesh,
    name: &str,
    args: Map<String, Value>,
) -> Result<ToolOutcome, ToolCallError> {
    let spec = specs()
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ToolCallError::UnknownTool(name.to_string()))?;
    let args = Args::check(spec, args)?;
    let outcome = match name {
        "register" => register(mesh, &args).await,
        "send" => send(mesh, &args).await,
        "broadcast" => broadcast(mesh, &args).await,
        "check" => check(mesh, &args).await,
        "wait" => wait(mesh, &args).await,
        "list_instances" => list_instances(mesh).await,
        "rename" => rename(mesh, &args).await,
        "share_file" => share_file(mesh, &args).await,
        "mesh_status" => mesh_status(mesh).await,
        other => return Err(ToolCallError::UnknownTool(other.to_string())),
    };
    Ok(outcome.unwrap_or_else(|e| ToolOutcome::Failed { text: e.text() }))
}

/// A failed tool, as a sentence for the model.
struct Failure(String);

impl Failure {
    fn text(self) -> String {
        self.0
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        let prefix = match e.kind() {
            Some(ErrorKind::UnknownRecipient) => "Unknown recipient: ",
            Some(ErrorKind::InboxFull) => "Inbox full: ",
            Some(ErrorKind::TooLarge) => "Too large: ",
            Some(ErrorKind::NotRegistered) => "Not registered: ",
            Some(ErrorKind::NameTaken) => "Name taken: ",
            Some(ErrorKind::RateLimited) => "Rate limited: ",
            _ => "",
        };
        let mut s = format!("{prefix}{e}");
        if e.kind() == Some(ErrorKind::NotRegistered) {
            s.push_str(". Call register with the name you want (instance_id), then retry");
        }
        Failure(s)
    }
}

type ToolResult = Result<ToolOutcome, Failure>;

fn done(text: String, structured: Value) -> ToolResult {
    Ok(ToolOutcome::Done { text, structured })
}

fn unexpected(reply: Reply) -> Failure {
    Failure(format!("unexpected reply from the broker: {reply:?}"))
}

fn parse_name(what: &str, raw: &str) -> Result<AgentName, Failure> {
    AgentName::new(raw).map_err(|e| Failure(format!("{what}: {e}")))
}

async fn register(mesh: &Mesh, args: &Args) -> ToolResult {
    let name = parse_name("instance_id", args.str("instance_id").unwrap_or_default())?;
    let r = mesh.register(name).await?;
    let mut text = format!(
        "Registered as {} on broker {}{}.",
        r.name,
        r.broker_id,
        if r.created { " (new name)" } else { "" }
    );
    text.push_str(&unread_sentence(r.unread));
    done(
        text,
        json!({"name": r.name.as_str(), "broker": r.broker_id, "created": r.created, "unread": r.unread}),
    )
}

/// Sends a direct message; used by `send` and `share_file`.
async fn send_message(
    mesh: &Mesh,
    out: Outgoing,
) -> Result<(String, String, &'static str, u64), Failure> {
    let mut out = out;
    // A dedup key makes resending after a lost connection safe: the broker answers a repeat
    // with the first reply instead of storing the message twice.
    out.dedup_key = Some(hex::encode(rand::random::<[u8; 16]>()));
    match mesh.call(Body::Send(out), true).await? {
        Reply::Sent { id, route, unread } => {
            let (to, kind) = match route {
                Route::Local { to } => (to, "local"),
                Route::Forwarded { to, .. } => (to, "forwarded"),
                Route::Held { to } => (to, "held"),
                Route::Remote { to, .. } => (to, "remote"),
            };
            Ok((id, to, kind, unread))
        }
        other => Err(unexpected(other)),
    }
}

fn route_sentence(id: &str, to: &str, route: &str, asked: &str) -> String {
    match route {
        "forwarded" => format!("Sent {id}: {asked} was renamed, so it was delivered to {to}."),
        "held" => {
            format!("Sent {id}: {to} has not registered yet; the message is held until it does.")
        }
        "remote" => format!(
            "Sent {id} to {to}, queued for the broker {to} is attached to; it is delivered as soon as that broker is reachable."
        ),
        _ => format!("Sent {id} to {to}."),
    }
}

async fn send(mesh: &Mesh, args: &Args) -> ToolResult {
    let to = args.str("to_id").unwrap_or_default().to_string();
    let out = Outgoing {
        to: to.clone(),
        content: args.str("content").unwrap_or_default().to_string(),
        data: args.object_text("data"),
        reply_to: args.str("reply_to").map(str::to_string),
        hold: args.bool("hold").unwrap_or(false),
        dedup_key: None,
    };
    let (id, delivered, route, unread) = send_message(mesh, out).await?;
    let text = route_sentence(&id, &delivered, route, &to) + &unread_sentence(unread);
    done(
        text,
        json!({"id": id, "to": delivered, "route": route, "unread": unread}),
    )
}

async fn broadcast(mesh: &Mesh, args: &Args) -> ToolResult {
    let body = Body::Broadcast {
        content: args.str("content").unwrap_or_default().to_string(),
        data: args.object_text("data"),
    };
    match mesh.call(body, true).await? {
        Reply::Broadcast {
            id,
            reached,
            skipped,
            unread,
        } => {
            let mut text = format!("Broadcast {id} reached {reached} agent(s).");
            for s in &skipped {
                text.push_str(&format!(" Not delivered to {}: {}.", s.name, s.reason));
            }
            text.push_str(&unread_sentence(unread));
            let skipped: Vec<Value> = skipped
                .iter()
                .map(|s| json!({"name": s.name, "reason": s.reason}))
                .collect();
            done(
                text,
                json!({"id": id, "reached": reached, "skipped": skipped, "unread": unread}),
            )
        }
        other => Err(unexpected(other)),
    }
}

async fn check(mesh: &Mesh, args: &Args) -> ToolResult {
    let limit = args.u64("limit").unwrap_or(CHECK_DEFAULT_LIMIT) as u32;
    let include_read = args.bool("include_read").unwrap_or(false);
    let body = Body::Fetch {
        include_read,
        limit,
        mark_read: false,
    };
    let (messages, unread) = match mesh.call(body, true).await? {
        Reply::Messages { messages, unread } => (messages, unread),
        other => return Err(unexpected(other)),
    };
    // Mark read exactly what is returned: a message shown is never lost, and one the call did
    // not return (limit, cancellation) stays unread for next time.
    let unread = ack(mesh, &messages).await?.unwrap_or(unread);
    done(
        messages_text(&messages, unread, false),
        json!({"messages": messages_json(&messages), "unread": unread}),
    )
}

/// Marks the unread ones among `messages` read; returns the unread count after, if it asked.
async fn ack(mesh: &Mesh, messages: &[MessageView]) -> Result<Option<u64>, Failure> {
    let ids: Vec<String> = messages
        .iter()
        .filter(|m| !m.read)
        .map(|m| m.id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(None);
    }
    match mesh.call(Body::Ack { ids }, true).await? {
        Reply::Acked { unread, .. } => Ok(Some(unread)),
        other => Err(unexpected(other)),
    }
}

async fn wait(mesh: &Mesh, args: &Args) -> ToolResult {
    let secs = args.f64("timeout_secs").unwrap_or(WAIT_DEFAULT_SECS);
    let timeout = Duration::from_secs_f64(secs).min(defaults::WAIT_MAX);
    let deadline = Instant::now() + timeout;
    // Long-poll on the current link; if the broker changes mid-wait, wait out the hand-over
    // and poll again for the time that is left, so the call still ends by its deadline
    // (plus at most one hand-over).
    let (messages, unread) = loop {
        let link = mesh.ready(true, Instant::now() + HANDOVER_WAIT).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let body = Body::Wait {
            timeout_ms: left.as_millis() as u64,
            limit: CHECK_DEFAULT_LIMIT as u32,
            mark_read: false,
        };
        match mesh.call_once(&link, body).await {
            Ok(Reply::Messages { messages, unread }) => break (messages, unread),
            Ok(other) => return Err(unexpected(other)),
            Err(Error::Disconnected) => {
                let mut rx = mesh.subscribe();
                let gen = link.gen;
                let _ = tokio::time::timeout(HANDOVER_WAIT, rx.wait_for(|l| l.gen != gen)).await;
            }
            Err(Error::Remote(w)) => return Err(CallError::Refused(w).into()),
            Err(e) => return Err(Failure(e.to_string())),
        }
    };
    let timed_out = messages.is_empty();
    let unread = ack(mesh, &messages).await?.unwrap_or(unread);
    done(
        messages_text(&messages, unread, true),
        json!({"messages": messages_json(&messages), "timed_out": timed_out, "unread": unread}),
    )
}

async fn list_instances(mesh: &Mesh) -> ToolResult {
    let agents = match mesh.call(Body::List, false).await? {
        Reply::Agents { agents } => agents,
        other => return Err(unexpected(other)),
    };
    let you = mesh.agent_name().map(|n| n.to_string());
    let unread = mesh.unread().await;
    let mut text = if agents.is_empty() {
        "No agents are registered yet.".to_string()
    } else {
        let mut t = format!("{} agent(s):\n", agents.len());
        for a in &agents {
            let me = if you.as_deref() == Some(a.name.as_str()) {
                " (you)"
            } else {
                ""
            };
            t.push_str(&format!(
                "- {}{me}: {} on broker {}, last seen {}\n",
                a.name,
                if a.online { "online" } else { "offline" },
                a.broker,
                a.last_seen
            ));
        }
        t
    };
    match unread {
        Some(n) => text.push_str(unread_sentence(n).trim_start()),
        None => text.push_str("You are not registered; call register to join."),
    }
    let agents: Vec<Value> = agents
        .iter()
        .map(|a| json!({"name": a.name, "broker": a.broker, "online": a.online, "last_seen": a.last_seen}))
        .collect();
    done(
        text,
        json!({"agents": agents, "you": you, "unread": unread}),
    )
}

async fn rename(mesh: &Mesh, args: &Args) -> ToolResult {
    let new = parse_name("new_id", args.str("new_id").unwrap_or_default())?;
    let r = mesh.rename(new).await?;
    let text = format!(
        "You are now {} (was {}). Messages sent to {} still reach you for a while.{}",
        r.new,
        r.old,
        r.old,
        unread_sentence(r.unread)
    );
    done(
        text,
        json!({"old": r.old.as_str(), "new": r.new.as_str(), "unread": r.unread}),
    )
}

async fn share_file(mesh: &Mesh, args: &Args) -> ToolResult {
    let to = args.str("to_id").unwrap_or_default().to_string();
    let raw_path = args.str("filepath").unwrap_or_default();
    check_share_path(raw_path)?;
    let path = std::path::PathBuf::from(raw_path);
    let description = args
        .str("description")
        .unwrap_or_default()
        .trim()
        .to_string();
    // Registration first, so an unregistered caller learns that before anything about files.
    mesh.ready(true, Instant::now() + HANDOVER_WAIT).await?;
    let limit = mesh.max_message_bytes();
    let shown = path.display().to_string();
    let meta = tokio::fs::metadata(&path).await.map_err(|e| {
        Failure(match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{shown} does not exist (relative paths start in {}); check the path",
                std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ),
            std::io::ErrorKind::PermissionDenied => {
                format!("{shown} cannot be read: permission denied")
            }
            _ => format!("{shown} cannot be read: {e}"),
        })
    })?;
    if meta.is_dir() {
        return Err(Failure(format!(
            "{shown} is a directory; share_file sends one regular file at a time"
        )));
    }
    if !meta.is_file() {
        return Err(Failure(format!(
            "{shown} is not a regular file (a device, socket or pipe); only regular files can be shared"
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone());
    let header = if description.is_empty() {
        format!("Shared file {name} ({} bytes):\n\n", meta.len())
    } else {
        format!(
            "Shared file {name} ({} bytes): {description}\n\n",
            meta.len()
        )
    };
    let data = json!({"file": {"name": name, "path": shown, "bytes": meta.len()}}).to_string();
    let room = limit.saturating_sub(header.len() + data.len());
    if meta.len() as usize > room {
        return Err(Failure(format!(
            "{shown} is too large: {} bytes, and a message may carry at most {room} bytes of file text (the broker's limit is {limit} bytes). Send a smaller file or the relevant part of it with send",
            meta.len()
        )));
    }
    let bytes = read_regular_file(&path, &meta, room)
        .await
        .map_err(|e| Failure(format!("{shown} cannot be read: {e}")))?;
    if bytes.len() > room {
        return Err(Failure(format!(
            "{shown} grew while it was read and is now too large ({} bytes, at most {room})",
            bytes.len()
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        Failure(format!(
            "{shown} is not UTF-8 text (a binary file?); share_file sends text files only"
        ))
    })?;
    let file_len = text.len();
    let out = Outgoing {
        to: to.clone(),
        content: header + &text,
        data: Some(data),
        reply_to: None,
        hold: false,
        dedup_key: None,
    };
    let (id, delivered, route, unread) = send_message(mesh, out).await?;
    let text = format!("Shared {name} ({file_len} bytes) with {delivered} as message {id}.");
    done(
        text + &unread_sentence(unread),
        json!({
            "id": id, "to": delivered, "route": route,
            "file": {"path": shown, "name": name, "bytes": file_len},
            "unread": unread
        }),
    )
}

/// The longest `filepath` `share_file` accepts, in bytes (Linux's PATH_MAX).
const SHARE_PATH_MAX: usize = 4096;

/// A path `share_file` may try: not empty, no NUL byte (the OS cannot take one, and it would
/// cut the path short), at most [`SHARE_PATH_MAX`] bytes.
fn check_share_path(path: &str) -> Result<(), Failure> {
    if path.trim().is_empty() {
        return Err(Failure(
            "filepath is empty; give the path of the file to share".into(),
        ));
    }
    if path.contains('\0') {
        return Err(Failure(
            "filepath contains a NUL character; no file has such a name".into(),
        ));
    }
    if path.len() > SHARE_PATH_MAX {
        return Err(Failure(format!(
            "filepath is {} bytes long; paths may be at most {SHARE_PATH_MAX} bytes",
            path.len()
        )));
    }
    Ok(())
}

/// Reads at most `max + 1` bytes of the regular file `path`, which `seen` described. The file
/// is opened without blocking and checked again once open, so one swapped for a pipe or a
/// device after the first look is refused instead of read (or waited on for ever).
async fn read_regular_file(
    path: &std::path::Path,
    seen: &std::fs::Metadata,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let (path, dev, ino) = (path.to_path_buf(), seen.dev(), seen.ino());
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.dev() != dev || meta.ino() != ino {
            return Err(std::io::Error::other(
                "it changed while it was opened and is no longer the regular file first seen",
            ));
        }
        let mut bytes = Vec::new();
        f.take(max as u64 + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn mesh_status(mesh: &Mesh) -> ToolResult {
    let status = match mesh.call(Body::Status, false).await? {
        Reply::Status(s) => s,
        other => return Err(unexpected(other)),
    };
    let link = mesh.link();
    let you = link.agent.as_ref().map(|a| a.name.to_string());
    let attached = link
        .conn
        .as_ref()
        .map_or_else(|| mesh.addr().to_string(), |c| c.addr().to_string());
    let unread = mesh.unread().await;
    let b = &status.broker;
    let mut text = format!(
        "Attached to broker {} at {}{} (version {}, up {} s, {} agent(s) known, {} peer(s)).\n",
        b.id,
        attached,
        if link.hosting {
            ", hosted by this assistant's ipc-mesh process"
        } else {
            ""
        },
        b.version,
        b.uptime_secs,
        status.agents.len(),
        status.peers.len()
    );
    match (&you, unread) {
        (Some(n), Some(u)) => text.push_str(&format!("You are {n}.{}", unread_sentence(u))),
        (Some(n), None) => text.push_str(&format!("You are {n}.")),
        (None, _) => text.push_str("You are not registered; call register to join."),
    }
    let mut structured = serde_json::to_value(&*status)
        .map_err(|e| Failure(format!("cannot encode the status: {e}")))?;
    if let Value::Object(m) = &mut structured {
        m.insert(
            "session".into(),
            json!({"name": you, "broker_addr": attached, "hosting": link.hosting}),
        );
        m.insert("unread".into(), json!(unread));
    }
    done(text, structured)
}

fn unread_sentence(unread: u64) -> String {
    match unread {
        0 => String::new(),
        1 => " You have 1 unread message: call check to read it.".into(),
        n => format!(" You have {n} unread messages: call check to read them."),
    }
}

/// A message as the documented JSON object (the same shape as `ipc-mesh check --json`).
fn messages_json(messages: &[MessageView]) -> Vec<Value> {
    messages.iter().map(MessageView::to_json).collect()
}

fn messages_text(messages: &[MessageView], unread: u64, waited: bool) -> String {
    if messages.is_empty() {
        return if waited {
            "No message arrived before the timeout. Call wait again to keep waiting.".into()
        } else {
            "No new messages. Call wait to block until one arrives.".into()
        };
    }
    let mut t = format!("{} message(s):\n", messages.len());
    for m in messages {
        t.push_str(&format!("\n[{}] from {} at {}", m.id, m.from, m.sent_at));
        if let Some(r) = &m.reply_to {
            t.push_str(&format!(" (reply to {r})"));
        }
        t.push('\n');
        t.push_str(&m.content);
        t.push('\n');
        if let Some(d) = &m.data {
            t.push_str(&format!("data: {d}\n"));
        }
    }
    if unread > 0 {
        t.push_str(&format!(
            "\n{unread} more unread: call check again to read them."
        ));
    }
    t
}

/// Arguments checked against a tool's input schema.
struct Args {
    map: Map<String, Value>,
}

impl Args {
    /// Checks types, required and unknown properties, and numeric bounds, as the schema says.
    fn check(spec: &ToolSpec, map: Map<String, Value>) -> Result<Args, ToolCallError> {
        let schema = &spec.input_schema;
        let props = schema["properties"]
            .as_object()
            .expect("schemas have properties");
        let bad = |m: String| {
            ToolCallError::InvalidArguments(format!("Invalid arguments for {}: {m}", spec.name))
        };
        for key in map.keys() {
            if !props.contains_key(key) {
                let known: Vec<&str> = props.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "unknown property '{key}' (expected {})",
                    if known.is_empty() {
                        "no arguments".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        for req in schema["required"].as_array().into_iter().flatten() {
            let req = req.as_str().expect("required names are strings");
            if !map.contains_key(req) {
                return Err(bad(format!("missing required property '{req}'")));
            }
        }
        for (key, value) in &map {
            let p = &props[key];
            let ty = p["type"].as_str().expect("input properties have one type");
            let ok = match ty {
                "string" => value.as_str().is_some_and(|s| {
                    let min = p["minLength"].as_u64().unwrap_or(0) as usize;
                    s.chars().count() >= min
                }),
                "boolean" => value.is_boolean(),
                "object" => value.is_object(),
                "integer" => value.as_u64().is_some() || value.as_i64().is_some(),
                "number" => value.is_number(),
                other => unreachable!("schema type {other} not used"),
            };
            if !ok {
                let what = match (ty, p["minLength"].as_u64()) {
                    ("string", Some(n)) if n > 0 => "a non-empty string".to_string(),
                    (t, _) => format!(
                        "a{} {t}",
                        if t == "integer" || t == "object" {
                            "n"
                        } else {
                            ""
                        }
                    ),
                };
                return Err(bad(format!("'{key}' must be {what}")));
            }
            if let Some(n) = value.as_f64().filter(|_| ty == "integer" || ty == "number") {
                let min = p["minimum"].as_f64();
                let max = p["maximum"].as_f64();
                if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                    return Err(bad(format!(
                        "'{key}' must be between {} and {}",
                        min.unwrap_or(f64::MIN),
                        max.unwrap_or(f64::MAX)
                    )));
                }
            }
        }
        Ok(Args { map })
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.map.get(key).and_then(Value::as_str)
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.map.get(key).and_then(Value::as_bool)
    }

    fn u64(&self, key: &str) -> Option<u64> {
        self.map.get(key).and_then(Value::as_u64)
    }

    fn f64(&self, key: &str) -> Option<f64> {
        self.map.get(key).and_then(Value::as_f64)
    }

    /// An object argument as JSON text, the form the broker stores.
    fn object_text(&self, key: &str) -> Option<String> {
        self.map
            .get(key)
            .filter(|v| v.is_object())
            .map(Value::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_paths_are_checked_before_the_file_system_sees_them() {
        let why = |p: &str| check_share_path(p).unwrap_err().0;
        assert!(why("").contains("empty"));
        assert!(why("a\0b").contains("NUL"));
        assert!(why(&"a/".repeat(3000)).contains("at most 4096"));
        assert!(check_share_path("notes.txt").is_ok());
    }

    #[tokio::test]
    async fn a_file_swapped_for_a_pipe_or_another_file_is_not_read() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, "hello").unwrap();
        let seen = std::fs::metadata(&path).unwrap();
        // Keeps the inode in use, so no replacement below can be given the same number.
        std::fs::hard_link(&path, dir.path().join("keep")).unwrap();
        assert_eq!(
            read_regular_file(&path, &seen, 100).await.unwrap(),
            b"hello"
        );
        // At most one byte over the room is read.
        assert_eq!(read_regular_file(&path, &seen, 2).await.unwrap().len(), 3);

        // Replaced by a pipe after the first look: refused at once, not waited on.
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_regular_file(&path, &seen, 100),
        )
        .await
        .expect("a pipe must not block the read");
        assert!(r.is_err());

        // Replaced by another regular file: a different inode, refused too.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "other").unwrap();
        let e = read_regular_file(&path, &seen, 100).await.unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
    }

    fn check(tool: &str, args: Value) -> Result<(), String> {
        let spec = specs().iter().find(|s| s.name == tool).unwrap();
        let Value::Object(m) = args else { panic!() };
        Args::check(spec, m).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn tools_are_listed_in_the_documented_order() {
        let names: Vec<&str> = specs().iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "register",
                "send",
                "broadcast",
                "check",
                "wait",
                "list_instances",
                "rename",
                "share_file",
                "mesh_status"
            ]
        );
        for s in specs() {
            assert_eq!(s.input_schema["type"], "object");
            assert_eq!(s.output_schema["type"], "object");
            let required = s.output_schema["required"].as_array().unwrap();
            assert!(
                required.contains(&json!("unread")),
                "{} lacks unread",
                s.name
            );
        }
    }

    #[test]
    fn arguments_are_checked_against_the_schema() {
        assert!(check("send", json!({"to_id": "bob", "content": "hi"})).is_ok());
        let e = check("send", json!({"to_id": "bob"})).unwrap_err();
        assert!(e.contains("missing required property 'content'"), "{e}");
        let e = check("send", json!({"to_id": "bob", "content": 5})).unwrap_err();
        assert!(e.contains("'content' must be a string"), "{e}");
        let e = check("send", json!({"to_id": "", "content": "x"})).unwrap_err();
        assert!(e.contains("non-empty"), "{e}");
        let e = check("send", json!({"to_id": "b", "content": "x", "from": "eve"})).unwrap_err();
        assert!(e.contains("unknown property 'from'"), "{e}");
        let e = check("send", json!({"to_id": "b", "content": "x", "data": [1]})).unwrap_err();
        assert!(e.contains("'data' must be an object"), "{e}");
        assert!(check("wait", json!({"timeout_secs": 0.5})).is_ok());
        let e = check("wait", json!({"timeout_secs": 51})).unwrap_err();
        assert!(e.contains("between 0 and 50"), "{e}");
        let e = check("check", json!({"limit": 1.5})).unwrap_err();
        assert!(e.contains("'limit' must be an integer"), "{e}");
        let e = check("list_instances", json!({"x": 1})).unwrap_err();
        assert!(e.contains("expected no arguments"), "{e}");
    }
}
