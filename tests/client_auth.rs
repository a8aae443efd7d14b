//! Client authentication against real broker processes: without the mesh secret a client gets
//! nothing but `Unauthorized`; with a wrong one it is refused; with the right one it works; a
//! broker that cannot prove the secret is not trusted.
//!
//! 127.0.0.x is loopback, so these brokers are told to require authentication with
//! `[broker] require_client_auth = true` — the switch that listening beyond loopback turns on
//! by itself (the last test checks that on 0.0.0.0).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use federation::wire::{self, Hello, Role};
use ipc_mesh::auth::{self, ClientSecret};
use ipc_mesh::client::Connection;
use ipc_mesh::error::{Error, ErrorKind};
use ipc_mesh::protocol::{Body, Reply, Request, Response, Welcome};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::*;

const SECRET: &str = "the right mesh secret, long enough";
const WRONG: &str = "a wrong mesh secret, also long enough";

/// A home whose mesh.toml requires client authentication with [`SECRET`] (file mode 0600).
fn auth_home(listen: &str) -> tempfile::TempDir {
    let home = temp_home();
    let secret = home.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        home.path().join("mesh.toml"),
        format!(
            "[broker]\nlisten = \"{listen}\"\nrequire_client_auth = true\n[mesh]\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    home
}

/// The CLI with an empty home (no config), `--broker addr`, and `secret` in the environment.
fn cli_with(addr: &str, secret: Option<&str>, args: &[&str]) -> (Output, tempfile::TempDir) {
    let home = temp_home();
    let mut cmd = Command::new(BIN);
    cmd.arg("--home")
        .arg(home.path())
        .args(["--broker", addr])
        .args(args)
        .env_remove("IPC_MESH_HOME")
        .env_remove("IPC_MESH_BROKER")
        .env_remove("IPC_MESH_SECRET")
        .stdin(Stdio::null());
    if let Some(s) = secret {
        cmd.env("IPC_MESH_SECRET", s);
    }
    (cmd.output().unwrap(), home)
}

async fn write_frame(s: &mut TcpStream, body: &[u8]) {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    s.write_all(&b).await.unwrap();
}

/// A raw connection past the hello; returns it with the welcome.
async fn raw(addr: &str) -> (TcpStream, Welcome) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    write_frame(&mut s, &Hello::new(Role::Client).encode()).await;
    let w = read_frame(&mut s).await.expect("welcome");
    (s, wire::decode(&w).expect("a welcome frame"))
}

fn unauthorized(e: &Error) -> bool {
    e.kind() == Some(ErrorKind::Unauthorized)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_a_client_gets_nothing_but_unauthorized() {
    let addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let home = auth_home(&addr);
    let _b = BrokerProc::start(home.path(), &addr);

    let (mut s, welcome) = raw(&addr).await;
    let nonce = welcome
        .auth_nonce
        .expect("the welcome asks for authentication");
    assert!(auth::parse_nonce(&nonce).is_some(), "a 16-byte hex nonce");

    // Every kind of request, pipelined: each gets Unauthorized for its own id, nothing else,
    // and after a bounded number of them the broker closes.
    let bodies = [
        Body::Ping,
        Body::List,
        Body::Status,
        Body::Register {
            name: "mallory".into(),
            token: None,
        },
        Body::Fetch {
            include_read: true,
            limit: 10,
            mark_read: false,
        },
    ];
    let mut sent = 0u64;
    for round in 0..4u64 {
        for (i, b) in bodies.iter().enumerate() {
            let id = 1 + round * 10 + i as u64;
            let req = Request {
                id,
                body: b.clone(),
            };
            // The broker may close mid-way (it allows a bounded number); stop writing then.
            let mut frame = BytesMut::new();
            let body = wire::encode(&req);
            frame.put_u32(body.len() as u32);
            frame.extend_from_slice(&body);
            if s.write_all(&frame).await.is_err() {
                break;
            }
            sent += 1;
        }
    }
    let mut answers = 0;
    while let Some(f) = read_frame(&mut s).await {
        let r: Response = wire::decode(&f).expect("a response frame");
        let e = r
            .result
            .expect_err("no request is served before authentication");
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e:?}");
        assert!(
            e.message.contains("IPC_MESH_SECRET"),
            "says what to do: {e}"
        );
        answers += 1;
    }
    assert!(
        answers >= 1 && answers <= sent,
        "{answers} answers to {sent}"
    );
    assert!(
        answers < 20,
        "the broker closes after a bounded number of refused requests ({answers})"
    );

    // The library and the CLI without a secret: a clear refusal naming the fix.
    let e = Connection::connect_with(&addr, Ok(None))
        .await
        .err()
        .unwrap();
    assert!(unauthorized(&e), "{e:?}");
    let (out, _h) = cli_with(&addr, None, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IPC_MESH_SECRET"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Attaching to the nearest broker (no --broker): the refusal, not "no broker answered".
    let near = temp_home();
    std::fs::write(
        near.path().join("mesh.toml"),
        format!("[broker]\nlisten = \"{addr}\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--home")
        .arg(near.path())
        .arg("list")
        .env_remove("IPC_MESH_SECRET")
        .env_remove("IPC_MESH_BROKER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires clients to prove"), "{err}");

    // A monitor without the secret still learns the broker is up.
    let (out, _h) = cli_with(&addr, None, &["health"]);
    assert!(out.status.success(), "health: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_is_refused_and_the_right_one_works() {
    let addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let home = auth_home(&addr);
    let b = BrokerProc::start(home.path(), &addr);

    // Raw: a wrong proof gets Unauthorized and a close.
    let (mut s, welcome) = raw(&addr).await;
    let nb = auth::parse_nonce(&welcome.auth_nonce.unwrap()).unwrap();
    let nc = [7u8; 16];
    let wrong = ClientSecret::new(WRONG).unwrap();
    let req = Request {
        id: 1,
        body: Body::Auth {
            client_nonce: hex::encode(nc),
            proof: auth::proof(&wrong, auth::Side::Client, &nb, &nc),
        },
    };
    write_frame(&mut s, &wire::encode(&req)).await;
    let r: Response = wire::decode(&read_frame(&mut s).await.expect("an answer")).unwrap();
    assert_eq!(r.id, 1);
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::Unauthorized);
    assert!(
        read_frame(&mut s).await.is_none(),
        "closed after a wrong proof"
    );

    // The library with the wrong secret.
    let e = Connection::connect_with(&addr, Ok(Some(wrong)))
        .await
        .err()
        .unwrap();
    assert!(unauthorized(&e), "{e:?}");
    assert!(e.to_string().contains("does not match"), "{e}");

    // The CLI with the wrong secret.
    let (out, _h) = cli_with(&addr, Some(WRONG), &["send", "--as", "eve", "bob", "hi"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The right secret: the library is served, and so is the CLI (secret from the env).
    let right = ClientSecret::new(SECRET).unwrap();
    let c = Connection::connect_with(&addr, Ok(Some(right)))
        .await
        .unwrap();
    assert!(matches!(
        c.call(Body::Ping).await.unwrap(),
        Reply::Pong { .. }
    ));
    let (out, bob_home) = cli_with(&addr, Some(SECRET), &["check", "--as", "bob"]);
    assert!(out.status.success(), "{out:?}");
    let (out, _h) = cli_with(
        &addr,
        Some(SECRET),
        &["send", "--as", "alice", "bob", "hello over auth"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(BIN)
        .arg("--home")
        .arg(bob_home.path())
        .args(["--broker", &addr, "check", "--as", "bob"])
        .env("IPC_MESH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello over auth"),
        "{out:?}"
    );

    // The failures are counted in status.
    let (out, _h) = cli_with(&addr, Some(SECRET), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["limits"]["client_auth"], true, "{v}");
    assert!(v["counters"]["auth_failures"].as_u64().unwrap() >= 2, "{v}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_cannot_prove_the_secret_is_not_trusted() {
    // A fake broker: asks for authentication, then answers any proof with a made-up one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _hello = read_frame(&mut s).await;
        let welcome = Welcome {
            broker_id: "0badf00d".into(),
            version: "0".into(),
            max_frame_bytes: 1 << 20,
            auth_nonce: Some(auth::new_nonce()),
        };
        write_frame(&mut s, &wire::encode(&welcome)).await;
        let req: Request = wire::decode(&read_frame(&mut s).await.unwrap()).unwrap();
        let fake = Response {
            id: req.id,
            result: Ok(Reply::Authenticated {
                proof: hex::encode([0u8; 32]),
            }),
        };
        write_frame(&mut s, &wire::encode(&fake)).await;
        let _ = read_frame(&mut s).await;
    });
    let secret = ClientSecret::new(SECRET).unwrap();
    let e = Connection::connect_with(&addr, Ok(Some(secret)))
        .await
        .err()
        .expect("a broker with a wrong proof is refused");
    assert!(unauthorized(&e), "{e:?}");
    assert!(e.to_string().contains("broker's proof"), "{e}");
}

#[test]
fn loopback_stays_zero_configuration() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let welcome = rt.block_on(async { raw(&addr).await.1 });
    assert_eq!(welcome.auth_nonce, None, "no authentication on loopback");
    let (out, _h) = cli_with(&addr, None, &["send", "--as", "a", "--hold", "b", "hi"]);
    assert!(out.status.success(), "{out:?}");
}

fn broker_start_fails(home: &Path, addr: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("--home")
        .arg(home)
        .args(["broker", "--listen", addr])
        .env_remove("IPC_MESH_SECRET")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1));
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return err;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker started; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_broker_without_a_usable_secret_refuses_to_start() {
    // Authentication required, no secret at all.
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    std::fs::write(
        home.path().join("mesh.toml"),
        "[broker]\nrequire_client_auth = true\n",
    )
    .unwrap();
    let err = broker_start_fails(home.path(), &addr, &[]);
    assert!(err.contains("secret"), "{err}");

    // A secret file other users can read is refused, with the fix.
    let home = auth_home(&addr);
    let secret = home.path().join("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = broker_start_fails(home.path(), &addr, &[]);
    assert!(err.contains("readable by other users"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");

    // Turning authentication off beyond loopback is refused.
    let home = temp_home();
    std::fs::write(
        home.path().join("mesh.toml"),
        "[broker]\nlisten = \"0.0.0.0:9\"\nrequire_client_auth = false\n",
    )
    .unwrap();
    let err = broker_start_fails(home.path(), "0.0.0.0:9", &[("IPC_MESH_SECRET", SECRET)]);
    assert!(err.contains("require_client_auth"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_loopback_authentication_is_on_by_itself_even_for_local_connections() {
    let port = free_port("0.0.0.0");
    let home = temp_home();
    let listen = format!("0.0.0.0:{port}");
    let local = format!("127.0.0.1:{port}");
    // The broker and the health check take the secret from the environment.
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(home.path())
        .args(["broker", "--listen", &listen])
        .env("IPC_MESH_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = async {
        for _ in 0..200 {
            if TcpStream::connect(&local).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let ok = up.await;
    let result = async {
        assert!(ok, "broker never listened");
        let (_s, welcome) = raw(&local).await;
        assert!(
            welcome.auth_nonce.is_some(),
            "no loopback exemption on a broker listening beyond loopback"
        );
        let e = Connection::connect_with(&local, Ok(None))
            .await
            .err()
            .unwrap();
        assert!(unauthorized(&e), "{e:?}");
        let c = Connection::connect_with(&local, Ok(Some(ClientSecret::new(SECRET).unwrap())))
            .await
            .unwrap();
        assert!(matches!(
            c.call(Body::Ping).await.unwrap(),
            Reply::Pong { .. }
        ));
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `ipc-mesh mcp` over stdio, newline-delimited JSON-RPC: initializes, makes one tool call,
/// returns its result (or panics after 20 s).
fn mcp_tool_call(
    addr: &str,
    secret: Option<&str>,
    agent: &str,
    tool: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let home = temp_home();
    let mut cmd = Command::new(BIN);
    cmd.arg("--home")
        .arg(home.path())
        .args(["--broker", addr, "mcp", "--agent", agent])
        .env_remove("IPC_MESH_SECRET")
        .env_remove("IPC_MESH_HOME")
        .env_remove("IPC_MESH_AGENT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(s) = secret {
        cmd.env("IPC_MESH_SECRET", s);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let mut say = |v: serde_json::Value| {
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    };
    say(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "client_auth", "version": "0"}}}),
    );
    say(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    say(
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": tool, "arguments": args}}),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let result = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = rx
            .recv_timeout(left)
            .expect("no answer to the tool call within 20 s");
        if v["id"] == 2 {
            break v;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn the_mcp_server_proves_the_secret_from_the_environment() {
    let addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let home = auth_home(&addr);
    let _b = BrokerProc::start(home.path(), &addr);

    let args = serde_json::json!({"to_id": "bob", "content": "via mcp", "hold": true});
    let r = mcp_tool_call(&addr, Some(SECRET), "alice", "send", args.clone());
    assert_eq!(r["result"]["isError"], false, "{r}");

    // Without the secret the tool says why instead of sending.
    let r = mcp_tool_call(&addr, None, "carol", "send", args);
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(r.to_string().contains("IPC_MESH_SECRET"), "{r}");
}
