//! `ipc-mesh demo`: a small mesh on this machine, shown working and surviving a crash.
//!
//! 1. Start three brokers (temporary homes, free loopback ports) that find each other.
//! 2. Attach alice, bob and carol, one per broker; send across the mesh; broadcast.
//! 3. Kill bob's broker with SIGKILL; alice keeps sending: the messages wait, durably, in her
//!    broker's outbox (status shows them).
//! 4. Restart bob's broker: the messages arrive, in order, each once.
//! 5. Stop everything and remove the temporary files.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use federation::AgentName;

use crate::bench::spawn::LocalMesh;
use crate::client::Client;
use crate::home::Home;
use crate::protocol::{MessageView, Outgoing, Reply, StatusView};

/// Runs the demo, writing what happens to `out`.
pub async fn run(out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "ipc-mesh demo: three brokers, three agents, one crash.\n"
    )?;

    let started = Instant::now();
    let mut mesh = LocalMesh::start(3)
        .await
        .context("starting the demo's brokers")?;
    let names = ["A", "B", "C"];
    wait(
        Duration::from_secs(15),
        "the brokers to link up",
        || async {
            let mut all = true;
            for i in 0..3 {
                all &= status(mesh.addr(i))
                    .await
                    .is_ok_and(|s| s.peers.iter().filter(|p| p.state == "up").count() == 2);
            }
            all
        },
    )
    .await?;
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(status(mesh.addr(i)).await?.broker.id);
        }
        v
    };
    writeln!(
        out,
        "1. Three brokers started and linked into a mesh in {} ms:",
        started.elapsed().as_millis()
    )?;
    for i in 0..3 {
        writeln!(
            out,
            "     broker {} = {}  at {}",
            names[i],
            ids[i],
            mesh.addr(i)
        )?;
    }

    let agent_home = tempfile::tempdir().context("a temporary home for the demo's agents")?;
    let home = Home::at(agent_home.path());
    let mut alice = attach(&mesh, 0, "alice", &home).await?;
    let mut bob = attach(&mesh, 1, "bob", &home).await?;
    let mut carol = attach(&mesh, 2, "carol", &home).await?;
    wait(
        Duration::from_secs(10),
        "every broker to know every agent",
        || async {
            let mut all = true;
            for i in 0..3 {
                all &= status(mesh.addr(i))
                    .await
                    .is_ok_and(|s| s.agents.len() == 3);
            }
            all
        },
    )
    .await?;
    writeln!(
        out,
        "\n2. alice attached to broker A, bob to B, carol to C; every broker lists all three."
    )?;

    let sent = Instant::now();
    let id = send(&mut alice, "bob", "hello bob, from broker A").await?;
    let got = read_n(&mut bob, 1).await?;
    writeln!(out, "\n3. alice -> bob: {:?} (id {id})", got[0].content)?;
    writeln!(
        out,
        "   bob read it on broker B {} ms after alice sent it.",
        sent.elapsed().as_millis()
    )?;

    let reached = match carol.broadcast("standup in 5 minutes", None).await? {
        Reply::Broadcast { reached, .. } => reached,
        other => bail!("unexpected reply {other:?}"),
    };
    let a = read_n(&mut alice, 1).await?;
    let b = read_n(&mut bob, 1).await?;
    writeln!(
        out,
        "\n4. carol broadcast {:?}: it reached {reached} agents; alice and bob each read it once.",
        a[0].content
    )?;
    debug_assert_eq!(a[0].id, b[0].id);

    mesh.kill9(1);
    drop(bob);
    writeln!(
        out,
        "\n5. Broker B (bob's) killed with SIGKILL. alice sends five more; each is acknowledged"
    )?;
    writeln!(out, "   once it is on disk in broker A's outbox:")?;
    let mut ids_sent = Vec::new();
    for i in 1..=5 {
        let text = format!("update {i} of 5");
        let id = send(&mut alice, "bob", &text).await?;
        writeln!(out, "     {id}  {text:?}")?;
        ids_sent.push(id);
    }
    let s = status(mesh.addr(0)).await?;
    if let Some(p) = s.peers.iter().find(|p| p.id == ids[1]) {
        writeln!(
            out,
            "   broker A's status: peer B is {}, {} messages waiting in its outbox.",
            p.state, p.outbox
        )?;
    }

    let restarted = Instant::now();
    mesh.restart(1).await.context("restarting broker B")?;
    let mut bob = attach(&mesh, 1, "bob", &home).await?;
    let got = read_n(&mut bob, 5).await?;
    writeln!(
        out,
        "\n6. Broker B restarted; {} ms later bob had all five, in order, each once:",
        restarted.elapsed().as_millis()
    )?;
    for m in &got {
        writeln!(out, "     {}  {:?}", m.id, m.content)?;
    }
    let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    if got_ids != ids_sent.iter().map(|s| s.as_str()).collect::<Vec<_>>() {
        bail!("bob received {got_ids:?}, expected {ids_sent:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (extra, _) = bob.check(None, 10).await?;
    if !extra.is_empty() {
        bail!("bob received {} unexpected messages", extra.len());
    }

    let s = status(mesh.addr(0)).await?;
    writeln!(
        out,
        "\n7. Broker A now: {} peers up, outbox empty: {}; duplicates dropped anywhere: {}.",
        s.peers.iter().filter(|p| p.state == "up").count(),
        s.peers.iter().all(|p| p.outbox == 0),
        sum_duplicates(&mesh).await
    )?;
    drop(mesh);
    writeln!(out, "\nDone: every acknowledged message was delivered exactly once. Brokers stopped, files removed.")?;
    Ok(())
}

async fn sum_duplicates(mesh: &LocalMesh) -> u64 {
    let mut n = 0;
    for i in 0..mesh.len() {
        if let Ok(s) = status(mesh.addr(i)).await {
            n += s.counters.duplicates_dropped;
        }
    }
    n
}

async fn status(addr: &str) -> anyhow::Result<StatusView> {
    Ok(Client::connect(addr).await?.status().await?)
}

async fn attach(mesh: &LocalMesh, i: usize, name: &str, home: &Home) -> anyhow::Result<Client> {
    let mut c = Client::connect(mesh.addr(i)).await?;
    c.register_as(&AgentName::new(name)?, home).await?;
    Ok(c)
}

async fn send(from: &mut Client, to: &str, text: &str) -> anyhow::Result<String> {
    match from
        .send(Outgoing {
            to: to.into(),
            content: text.into(),
            ..Default::default()
        })
        .await?
    {
        Reply::Sent { id, .. } => Ok(id),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Reads until `n` messages arrived (bounded).
async fn read_n(c: &mut Client, n: usize) -> anyhow::Result<Vec<MessageView>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} messages arrived within 20 s", got.len());
        }
        let (msgs, _) = c.check(Some(Duration::from_millis(500)), 100).await?;
        got.extend(msgs);
    }
    Ok(got)
}

async fn wait<F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
