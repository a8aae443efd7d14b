//! The only file that names rmcp types: the MCP handler, the stdio transport, and the exit.
//!
//! 1. [`serve_stdio`] wraps rmcp's stdio transport in [`Stdio`], which reports stdin EOF and
//!    drops notifications that arrive before the lifecycle starts (rmcp would otherwise
//!    abandon the session with "expected initialize request").
//! 2. rmcp answers `initialize` (echoing any of the four handshake versions, falling back to
//!    2025-11-25 for unknown ones) and `server/discover` (the 2026-07-28 era) from
//!    [`Handler::get_info`]; nothing there waits for a broker.
//! 3. `tools/list` returns [`tools::specs`]; `tools/call` runs [`tools::call`] under the
//!    request's cancellation token, so `notifications/cancelled` stops it and rmcp sends
//!    nothing for it. Unknown tools and bad arguments become JSON-RPC -32602; known methods
//!    whose params do not parse land in `on_custom_request` and get -32602 too.
//! 4. After `notifications/initialized`, if the client announced `claude/channel` (or the user
//!    forced it), the push pump starts with a [`Peer`] clone.
//! 5. When stdin closes, in-flight calls get a short grace to answer, then [`serve_stdio`]
//!    returns; rmcp's own drain (5 s) is not waited for.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest, ContentBlock,
    CustomNotification, CustomRequest, CustomResult, DiscoverRequestMethod, DiscoverResult,
    ErrorCode, GetMeta, Implementation, JsonObject, JsonRpcMessage, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, ServerNotification,
    Tool,
};
use rmcp::service::{
    NotificationContext, Peer, RequestContext, RoleServer, RxJsonRpcMessage, ServerInitializeError,
    TxJsonRpcMessage,
};
use rmcp::transport::{IntoTransport, Transport};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::channel::{self, ChannelEvent, Push};
use super::session::Mesh;
use super::tools::{self, ToolCallError, ToolOutcome};
use super::{ChannelMode, Era, Options};

/// The experimental capability Claude Code looks for in the server's capabilities.
const CHANNEL_CAP: &str = "claude/channel";
const CHANNEL_METHOD: &str = "notifications/claude/channel";
/// After stdin closes, how long calls in flight may still answer.
const EOF_GRACE: Duration = Duration::from_millis(500);

const INSTRUCTIONS: &str = "ipc-mesh lets you message other AI assistants (Claude Code, Gemini CLI, Codex, ...) on this machine or across a mesh. \
Register once with a name (register), unless the session was started with one. \
Messages from others reach you only when you call check (returns at once) or wait (blocks up to 50 s): call check when you start and between steps, and when a result says you have unread messages. \
Use send to write to one agent (reply_to answers a message), broadcast for everyone, list_instances to see who is there, share_file to send a text file, mesh_status to diagnose. \
If channel events (<channel source=...>) arrive, they are messages already marked read; answer them with send, setting reply_to to their message_id.";

/// The MCP handler: static tool list, tool calls through the session.
struct Handler {
    mesh: Mesh,
    options: Options,
    tools: Arc<[Tool]>,
    pump_started: AtomicBool,
    pump_stop: CancellationToken,
    in_flight: Arc<InFlight>,
}

/// Tool calls currently running, so EOF can wait for them briefly and no longer.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn schema(v: &Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m.clone()),
        _ => unreachable!("tool schemas are JSON objects"),
    }
}

impl Handler {
    fn new(mesh: Mesh, options: Options) -> Handler {
        let tools: Vec<Tool> = tools::specs()
            .iter()
            .map(|s| {
                Tool::new(s.name, s.description, schema(&s.input_schema))
                    .with_title(s.title)
                    .with_raw_output_schema(schema(&s.output_schema))
            })
            .collect();
        Handler {
            mesh,
            options,
            tools: tools.into(),
            pump_started: AtomicBool::new(false),
            pump_stop: CancellationToken::new(),
            in_flight: Arc::default(),
        }
    }
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        let mut caps = ServerCapabilities::builder().enable_tools().build();
        // Declared by the server: this is what Claude Code looks for to accept pushes.
        let mut experimental = std::collections::BTreeMap::new();
        experimental.insert(CHANNEL_CAP.to_string(), JsonObject::new());
        caps.experimental = Some(experimental);
        ServerConfig::new(caps)
            // The answer to an `initialize` with a version we do not know.
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
            .with_server_info(Implementation::new("ipc-mesh", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn discover(&self, _ctx: RequestContext<RoleServer>) -> Result<DiscoverResult, McpError> {
        if self.options.era == Era::Legacy {
            // Dual-era clients then fall back to `initialize`, where channel pushes work.
            return Err(McpError::method_not_found::<DiscoverRequestMethod>());
        }
        Ok(DiscoverResult::from_server_info(
            self.supported_protocol_versions().into_owned(),
            self.get_info(),
        ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let _running = self.in_flight.enter();
        let args = request.arguments.unwrap_or_default();
        let name = request.name.to_string();
        let outcome = tokio::select! {
            r = tools::call(&self.mesh, &name, args) => r,
            _ = ctx.ct.cancelled() => {
                // rmcp sends nothing for a cancelled request; this value is dropped.
                tracing::debug!(tool = %name, "tool call cancelled");
                return Err(McpError::internal_error("cancelled", None));
            }
        };
        match outcome {
            Ok(ToolOutcome::Done { text, structured }) => {
                let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
                r.structured_content = Some(structured);
                Ok(r.into())
            }
            Ok(ToolOutcome::Failed { text }) => {
                Ok(CallToolResult::error(vec![ContentBlock::text(text)]).into())
            }
            Err(ToolCallError::UnknownTool(t)) => Err(McpError::invalid_params(
                format!("Unknown tool: {t}"),
                Some(json!({"tool": t})),
            )),
            Err(e @ ToolCallError::InvalidArguments(_)) => {
                Err(McpError::invalid_params(e.to_string(), None))
            }
        }
    }

    /// Methods rmcp could not parse into a typed request land here, including known methods
    /// with malformed params (`tools/call` with `"arguments": "x"`): those are invalid params,
    /// not unknown methods.
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        const KNOWN: &[&str] = &[
            "initialize",
            "ping",
            "tools/list",
            "tools/call",
            "server/discover",
        ];
        if KNOWN.contains(&request.method.as_str()) {
            return Err(McpError::invalid_params(
                format!("malformed params for {}", request.method),
                None,
            ));
        }
        Err(McpError::new(
            ErrorCode::METHOD_NOT_FOUND,
            format!("Method not found: {}", request.method),
            None,
        ))
    }

    async fn on_initialized(&self, ctx: NotificationContext<RoleServer>) {
        let announced = ctx
            .peer
            .peer_info()
            .and_then(|info| {
                info.capabilities
                    .experimental
                    .as_ref()
                    .map(|e| e.contains_key(CHANNEL_CAP))
            })
            .unwrap_or(false);
        let push = match self.options.channel {
            ChannelMode::Always => true,
            ChannelMode::Never => false,
            ChannelMode::Auto => announced,
        };
        tracing::debug!(announced, push, "client initialized");
        if !push || self.pump_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let sink: Arc<dyn Push> = Arc::new(PeerPush(ctx.peer.clone()));
        tokio::spawn(channel::pump(
            self.mesh.clone(),
            sink,
            self.pump_stop.clone(),
        ));
    }
}

/// Pushes channel events to the client as `notifications/claude/channel`.
struct PeerPush(Peer<RoleServer>);

impl Push for PeerPush {
    fn push(&self, event: ChannelEvent) -> BoxFuture<'static, bool> {
        let peer = self.0.clone();
        Box::pin(async move {
            let params = json!({"content": event.content, "meta": event.meta});
            let n = ServerNotification::CustomNotification(CustomNotification::new(
                CHANNEL_METHOD,
                Some(params),
            ));
            peer.send_notification(n).await.is_ok()
        })
    }
}

/// How a stdio session ended.
pub enum Exit {
    /// stdin closed (before or after `initialize`), or a stop was requested.
    Clean,
    Failed(String),
}

/// Wraps rmcp's stdio transport:
/// - reports stdin EOF, because after EOF rmcp keeps draining in-flight handlers for up to
///   5 s, and we must exit within 2;
/// - drops notifications that arrive before the lifecycle starts, which would otherwise end
///   rmcp's server with "expected initialize request".
struct Stdio<T> {
    inner: T,
    eof: Option<oneshot::Sender<()>>,
    started: bool,
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Stdio<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            let msg = self.inner.receive().await;
            match &msg {
                None => {
                    if let Some(tx) = self.eof.take() {
                        let _ = tx.send(());
                    }
                }
                Some(JsonRpcMessage::Notification(n)) if !self.started => {
                    tracing::debug!(?n, "dropping a notification sent before initialize");
                    continue;
                }
                Some(JsonRpcMessage::Request(r)) if !self.started => {
                    // Mirrors rmcp's pre-lifecycle loop: the lifecycle starts with
                    // `initialize`, or with a request (not ping/discover) carrying
                    // complete, supported 2026-07-28 `_meta`.
                    self.started = match &r.request {
                        ClientRequest::InitializeRequest(_) => true,
                        ClientRequest::PingRequest(_) | ClientRequest::DiscoverRequest(_) => false,
                        other => {
                            let meta = other.get_meta();
                            meta.missing_required_keys(&ProtocolVersion::V_2026_07_28)
                                .is_empty()
                                && meta
                                    .protocol_version()
                                    .is_some_and(|v| ProtocolVersion::KNOWN_VERSIONS.contains(&v))
                        }
                    };
                }
                _ => {}
            }
            return msg;
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

/// Serves MCP on stdin/stdout until stdin closes or `stop` is cancelled.
///
/// The caller must exit the process soon after: rmcp's service is deliberately leaked (see
/// the end of this function), and tokio's stdin reader thread cannot be interrupted.
pub async fn serve_stdio(mesh: Mesh, options: Options, stop: CancellationToken) -> Exit {
    let handler = Handler::new(mesh, options);
    let in_flight = handler.in_flight.clone();
    let pump_stop = handler.pump_stop.clone();
    let (eof_tx, eof_rx) = oneshot::channel();
    let inner =
        IntoTransport::<RoleServer, std::io::Error, _>::into_transport(rmcp::transport::stdio());
    let transport = Stdio {
        inner,
        eof: Some(eof_tx),
        started: false,
    };
    let running = tokio::select! {
        r = handler.serve(transport) => match r {
            Ok(r) => r,
            Err(ServerInitializeError::ConnectionClosed(_)) => return Exit::Clean,
            Err(e) => return Exit::Failed(e.to_string()),
        },
        _ = stop.cancelled() => return Exit::Clean,
    };
    let eof_then_grace = async {
        if eof_rx.await.is_ok() {
            let _ = tokio::time::timeout(EOF_GRACE, in_flight.wait_idle()).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut waiting = Box::pin(running.waiting());
    let exit = tokio::select! {
        r = &mut waiting => match r {
            Ok(reason) => {
                tracing::debug!(?reason, "session ended");
                Exit::Clean
            }
            Err(e) => Exit::Failed(e.to_string()),
        },
        _ = eof_then_grace => Exit::Clean,
        _ = stop.cancelled() => Exit::Clean,
    };
    pump_stop.cancel();
    // Dropping the running service would cancel in-flight handlers, whose error replies rmcp
    // would still write to stdout after the client stopped listening. The process exits right
    // after this returns, so leak it instead.
    std::mem::forget(waiting);
    exit
}
