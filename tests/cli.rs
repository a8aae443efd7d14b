//! The CLI against a real broker process: what a person does from two terminals.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn two_agents_exchange_messages() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path();

    assert_eq!(
        cli_ok(h, &addr, &["check", "--as", "bob"]).trim(),
        "no new messages"
    );
    let id = cli_ok(
        h,
        &addr,
        &[
            "send",
            "--as",
            "alice",
            "bob",
            "hello bob",
            "--data",
            r#"{"k":1}"#,
        ],
    );
    let id = id.trim().to_string();
    assert!(id.contains(':'), "message id {id}");

    let out = cli_ok(h, &addr, &["check", "--as", "bob", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = &v["messages"][0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["from"], "alice");
    assert_eq!(m["to"], "bob");
    assert_eq!(m["content"], "hello bob");
    assert_eq!(m["data"]["k"], 1);
    assert!(m["reply_to"].is_null());
    assert!(m["sent_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["unread"], 0);

    // Read messages are not shown again.
    assert_eq!(
        cli_ok(h, &addr, &["check", "--as", "bob"]).trim(),
        "no new messages"
    );

    // A reply, in the human format.
    cli_ok(
        h,
        &addr,
        &[
            "send",
            "--as",
            "bob",
            "alice",
            "hi alice",
            "--reply-to",
            &id,
        ],
    );
    let out = cli_ok(h, &addr, &["check", "--as", "alice"]);
    assert!(
        out.contains("from bob") && out.contains("hi alice") && out.contains(&id),
        "{out}"
    );

    let list = cli_ok(h, &addr, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alice", "bob"]);
    for a in v["agents"].as_array().unwrap() {
        assert!(a["broker"].is_string() && a["online"].is_boolean() && a["last_seen"].is_string());
    }
}

#[test]
fn typos_are_refused_with_suggestions_and_hold_keeps_messages() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path();
    cli_ok(h, &addr, &["check", "--as", "robert"]);
    let err = cli_err(h, &addr, &["send", "--as", "alice", "robrt", "hi"]);
    assert!(err.contains("robert"), "suggests the close name: {err}");
    assert!(err.lines().count() == 1, "one line: {err}");

    cli_ok(
        h,
        &addr,
        &["send", "--as", "alice", "newcomer", "welcome", "--hold"],
    );
    let out = cli_ok(h, &addr, &["check", "--as", "newcomer"]);
    assert!(out.contains("welcome"), "{out}");
}

#[test]
fn check_wait_returns_as_soon_as_a_message_arrives() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path().to_path_buf();
    cli_ok(&h, &addr, &["check", "--as", "waiter"]);

    let (h2, addr2) = (h.clone(), addr.clone());
    let started = Instant::now();
    let waiter = std::thread::spawn(move || {
        cli_ok(
            &h2,
            &addr2,
            &["check", "--as", "waiter", "--wait", "30s", "--json"],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    cli_ok(&h, &addr, &["send", "--as", "sender", "waiter", "ping"]);
    let out = waiter.join().unwrap();
    let elapsed = started.elapsed();
    assert!(out.contains("ping"), "{out}");
    // Generous bound: the point is that it did not sit out the 30 s.
    assert!(elapsed < Duration::from_secs(20), "wait took {elapsed:?}");

    // With nothing to read, it returns empty after its timeout.
    let out = cli_ok(
        &h,
        &addr,
        &["check", "--as", "waiter", "--wait", "300ms", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
}

#[test]
fn rename_forwards_and_notifies() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path();
    cli_ok(h, &addr, &["check", "--as", "old-name"]);
    cli_ok(h, &addr, &["check", "--as", "watcher"]);
    cli_ok(
        h,
        &addr,
        &["send", "--as", "watcher", "old-name", "before rename"],
    );

    cli_ok(h, &addr, &["rename", "--as", "old-name", "new-name"]);
    assert!(h.join("agents/new-name.token").exists());
    assert!(!h.join("agents/old-name.token").exists());

    // Others are told.
    let out = cli_ok(h, &addr, &["check", "--as", "watcher", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["messages"][0]["from"], "system");
    assert!(v["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("old-name renamed to new-name"));

    // The old name forwards, and the inbox moved.
    cli_ok(
        h,
        &addr,
        &["send", "--as", "watcher", "old-name", "after rename"],
    );
    let out = cli_ok(h, &addr, &["check", "--as", "new-name", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let contents: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, vec!["before rename", "after rename"]);
    assert!(v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["to"] == "new-name"));

    // The old name cannot be claimed while it forwards, and nobody can rename someone else.
    let err = cli_err(h, &addr, &["check", "--as", "old-name"]);
    assert!(err.contains("renamed"), "{err}");
    let list = cli_ok(h, &addr, &["list", "--json"]);
    assert!(!list.contains("\"old-name\""), "{list}");
}

#[test]
fn tokens_and_unread_messages_survive_a_clean_restart() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut b = BrokerProc::start(home.path(), &addr);
    let h = home.path();
    cli_ok(h, &addr, &["check", "--as", "bob"]);
    for i in 0..5 {
        cli_ok(
            h,
            &addr,
            &["send", "--as", "alice", "bob", &format!("m{i}")],
        );
    }
    let status = b.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(b.log_text().contains("storage flushed"), "{}", b.log_text());
    b.restart();

    // Same tokens still work (no "held by another agent"), and the messages are there, in order.
    let out = cli_ok(h, &addr, &["check", "--as", "bob", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let contents: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, vec!["m0", "m1", "m2", "m3", "m4"]);
    cli_ok(h, &addr, &["send", "--as", "alice", "bob", "after restart"]);
}

#[test]
fn impersonation_is_refused_and_changes_nothing() {
    let home = temp_home();
    let thief_home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path();
    cli_ok(
        h,
        &addr,
        &["send", "--as", "alice", "alice", "note to self", "--hold"],
    );

    // Another home has no token for alice: the name is held.
    let err = cli_err(thief_home.path(), &addr, &["check", "--as", "alice"]);
    assert!(err.contains("held by another agent"), "{err}");

    // A forged token of the right shape.
    std::fs::create_dir_all(thief_home.path().join("agents")).unwrap();
    std::fs::write(
        thief_home.path().join("agents/alice.token"),
        "ab".repeat(32),
    )
    .unwrap();
    let err = cli_err(thief_home.path(), &addr, &["check", "--as", "alice"]);
    assert!(err.contains("token does not match"), "{err}");

    // Garbage in the token file.
    std::fs::write(thief_home.path().join("agents/alice.token"), "stolen?").unwrap();
    let err = cli_err(
        thief_home.path(),
        &addr,
        &["send", "--as", "alice", "alice", "x"],
    );
    assert!(err.contains("not a valid token"), "{err}");

    // Nothing changed: alice's message is still there, unread, and her token still works.
    let out = cli_ok(h, &addr, &["check", "--as", "alice"]);
    assert!(out.contains("note to self"), "{out}");

    // The reserved name.
    let err = cli_err(h, &addr, &["check", "--as", "system"]);
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn expired_tokens_are_refused() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let cfg = home.path().join("mesh.toml");
    std::fs::write(&cfg, "[limits]\nretention = \"1s\"\n").unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let _b = BrokerProc::start_with(home.path(), &addr, &["--config", &cfg_s]);
    let h = home.path();
    cli_ok(h, &addr, &["check", "--as", "ephemeral"]);
    let token = std::fs::read_to_string(h.join("agents/ephemeral.token")).unwrap();
    // Unseen for longer than the retention, the claim lapses (the sweep runs every second).
    std::thread::sleep(Duration::from_millis(3500));
    let err = cli_err(h, &addr, &["check", "--as", "ephemeral"]);
    assert!(err.contains("expired"), "{err}");
    // The refusal changed nothing: the token file is untouched.
    assert_eq!(
        std::fs::read_to_string(h.join("agents/ephemeral.token")).unwrap(),
        token
    );
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1_on_one_line() {
    let home = temp_home();
    let out = std::process::Command::new(BIN)
        .args(["send"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(BIN)
        .args(["frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // Nothing listens here.
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let err = cli_err(home.path(), &addr, &["health"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach a broker"), "{err}");

    let err = cli_err(
        home.path(),
        &addr,
        &["send", "--as", "bad name!", "bob", "x"],
    );
    assert!(err.contains("invalid agent name"), "{err}");

    let cfg = home.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nretention = \"soon\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "broker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("retention") && err.contains("soon"), "{err}");
}

#[test]
fn status_json_has_the_documented_fields() {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let _b = BrokerProc::start(home.path(), &addr);
    let h = home.path();
    cli_ok(h, &addr, &["send", "--as", "a", "a", "x", "--hold"]);
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(h, &addr, &["status", "--json"])).unwrap();
    assert_eq!(v["broker"]["listen"], addr.as_str());
    assert_eq!(v["broker"]["id"].as_str().unwrap().len(), 8);
    assert!(v["peers"].is_array());
    assert_eq!(v["agents"][0]["name"], "a");
    assert!(v["clock"].is_array());
    let human = cli_ok(h, &addr, &["status"]);
    assert!(
        human.contains("broker ") && human.contains("agents"),
        "{human}"
    );
}
