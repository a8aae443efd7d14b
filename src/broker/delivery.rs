//! The broker's side of cross-broker delivery: its storage, as the mesh node sees it.
//!
//! 1. `outbox` hands the node durable envelopes to stream; `trim` deletes what the next hop
//!    acknowledged (not flushed: if that is lost in a crash, the envelopes go again and the
//!    receiver drops them as duplicates).
//! 2. `accept` classifies each arriving envelope ([`federation::delivery::classify`]) and
//!    writes the outcome (inbox entries, relayed or forwarded envelopes, the clock) in one
//!    atomic batch. The node acknowledges once the flush that covers it is done.
//! 3. Agents that moved take their unread messages with them; messages held for a name that
//!    turns up on another broker go there.

use std::collections::BTreeMap;

use federation::delivery::{classify, in_order, route, Arrival, Envelope, MeshStore};
use federation::{AgentName, BrokerId, Dot};

use super::{Broker, State};
use crate::inbox;
use crate::outbox;
use crate::storage::{keys, Batch};

/// The broker's storage, for its mesh node.
pub struct Store(pub Broker);

impl MeshStore for Store {
    fn outbox(&self, dest: BrokerId, after: u64, limit: usize) -> Vec<(u64, Envelope)> {
        let visible = self.0.commit().durable().arrival;
        outbox::read(&*self.0.inner.engine, dest, after, visible, limit).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the outbox");
            Vec::new()
        })
    }

    fn outbox_depths(&self) -> Vec<(BrokerId, u64)> {
        let s = self.0.state();
        s.outbox_depth
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, n)| (*d, *n))
            .collect()
    }

    fn trim(&self, dest: BrokerId, upto: u64) {
        let b = &self.0;
        let mut s = b.state();
        let mut batch = Batch::new();
        let mut after: Option<Vec<u8>> = None;
        let prefix = outbox::prefix(dest);
        'pages: loop {
            let page = match b.inner.engine.scan(&prefix, after.as_deref(), 1024) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot trim the outbox");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (k, _) in page {
                match outbox::parse_key(&k) {
                    Some((_, pos)) if pos <= upto => batch.delete(k),
                    _ => break 'pages,
                }
            }
        }
        let n = batch.ops.len() as u64;
        if n > 0 && b.apply(&mut s, batch).is_ok() {
            let d = s.outbox_depth.entry(dest).or_default();
            *d = d.saturating_sub(n);
            s.outbox_total = s.outbox_total.saturating_sub(n);
        }
    }

    fn accept(&self, entries: Vec<Envelope>) -> u64 {
        let b = &self.0;
        let me = b.id();
        let mesh = b.mesh_handle();
        let now = super::now_ms();
        let mut s = b.state();
        let mut batch = Batch::new();
        let mut touched: Vec<BrokerId> = Vec::new();
        let c = &b.inner.counters;
        // Envelopes parked in the reorder buffer by this very batch (not in storage yet).
        let mut staged: BTreeMap<(BrokerId, u64), Envelope> = BTreeMap::new();
        for env in entries {
            let arrival = {
                let st: &State = &s;
                classify(
                    &env,
                    me,
                    &st.clock,
                    |a| st.agents.get(a).is_some_and(|x| !x.record.is_forward()),
                    |a| {
                        mesh.as_ref()
                            .and_then(|m| m.lookup(a.as_str()))
                            .map(|e| e.owner)
                    },
                    Vec::new,
                )
            };
            match arrival {
                Arrival::Duplicate => {
                    c.duplicates
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Arrival::Relay => {
                    let Ok(pos) = b.next_seq(&mut s) else {
                        continue;
                    };
                    let mut env = env;
                    env.hops += 1;
                    batch.put(outbox::key(env.dest, pos), federation::wire::encode(&env));
                    *s.outbox_depth.entry(env.dest).or_default() += 1;
                    s.outbox_total += 1;
                    s.last_arrival = s.last_arrival.max(pos);
                    c.relayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ if !in_order(&s.clock, &env) => {
                    // It overtook its predecessor: park it until that one arrives.
                    let origin = env.tdot.origin;
                    s.clock.accept(env.tdot, env.prev);
                    touched.push(origin);
                    batch.put(
                        outbox::pending_key(origin, env.tdot.seq),
                        federation::wire::encode(&env),
                    );
                    staged.insert((origin, env.tdot.seq), env);
                }
                _ => {
                    let origin = env.tdot.origin;
                    s.clock.accept(env.tdot, env.prev);
                    touched.push(origin);
                    b.hand_on(&mut s, &mut batch, mesh.as_ref(), env, now);
                    // Whatever waited for this one goes now, in order.
                    let upto = s.clock.contiguous(origin);
                    let mut ready: BTreeMap<u64, (Option<Vec<u8>>, Envelope)> = BTreeMap::new();
                    if let Ok(stored) =
                        b.inner
                            .engine
                            .scan(&outbox::pending_prefix(origin), None, usize::MAX)
                    {
                        for (k, v) in stored {
                            let Ok(e) = outbox::decode(&v) else { continue };
                            if e.tdot.seq <= upto {
                                ready.insert(e.tdot.seq, (Some(k), e));
                            }
                        }
                    }
                    let staged_ready: Vec<(BrokerId, u64)> = staged
                        .range((origin, 0)..=(origin, upto))
                        .map(|(k, _)| *k)
                        .collect();
                    for k in staged_ready {
                        let e = staged.remove(&k).expect("listed");
                        ready.insert(k.1, (Some(outbox::pending_key(origin, k.1)), e));
                    }
                    for (_, (key, e)) in ready {
                        if let Some(key) = key {
                            batch.delete(key);
                        }
                        b.hand_on(&mut s, &mut batch, mesh.as_ref(), e, now);
                    }
                }
            }
        }
        touched.sort();
        touched.dedup();
        for origin in touched {
            if let Some(o) = s.clock.origin(origin) {
                batch.put(outbox::clock_key(origin), federation::wire::encode(o));
            }
        }
        if batch.is_empty() {
            return s.epoch;
        }
        s.seen_now.clear();
        match b.apply(&mut s, batch) {
            Ok(epoch) => {
                drop(s);
                b.commit().request();
                epoch
            }
            Err(e) => {
                // Nothing was stored: the epoch never becomes durable for this write, so no
                // acknowledgement goes out and the sender will send again.
                tracing::error!(error = %e.message, "cannot store arriving messages");
                u64::MAX
            }
        }
    }

    fn durable(&self) -> u64 {
        self.0.commit().durable().epoch
    }
}

impl Broker {
    /// Delivers, holds or forwards an envelope whose turn it is. Call with the lock held.
    fn hand_on(
        &self,
        s: &mut State,
        batch: &mut Batch,
        mesh: Option<&federation::driver::Handle>,
        env: Envelope,
        now: u64,
    ) {
        if let Some(mk) = env.marker {
            // Not a message: an origin re-routed a recipient's messages.
            self.on_marker(s, batch, env.tdot.origin, mk);
            return;
        }
        if let Some(fence) = env.closes {
            // Not a message: its sender has left that attachment of the origin broker.
            let from = env.message.from.clone();
            self.close_fence(s, batch, &from, fence, env.message.after);
            return;
        }
        let arrival = {
            let st: &State = s;
            route(
                &env,
                self.id(),
                |a| st.agents.get(a).is_some_and(|x| !x.record.is_forward()),
                |a| mesh.and_then(|m| m.lookup(a.as_str())).map(|e| e.owner),
                || {
                    st.agents
                        .iter()
                        .filter(|(_, x)| !x.record.is_forward())
                        .map(|(n, _)| n.clone())
                        .collect()
                },
            )
        };
        match arrival {
            Arrival::Deliver(to) => {
                for agent in to {
                    let wait = wait_for(&env, &agent);
                    self.put_inbox(s, batch, &agent, &env.message, wait);
                }
            }
            Arrival::Hold(to) => self.put_inbox(s, batch, &to, &env.message, None),
            Arrival::Broadcast { deliver, forward } => {
                for agent in deliver {
                    let wait = wait_for(&env, &agent);
                    self.put_inbox(s, batch, &agent, &env.message, wait);
                }
                for (agent, dest) in forward {
                    let mut m = env.message.clone();
                    m.to = agent;
                    self.forward_message(s, batch, dest, m, now);
                }
            }
            Arrival::Forward(dest) => {
                self.forward_message(s, batch, dest, env.message, now);
            }
            Arrival::Duplicate | Arrival::Relay => {}
        }
    }

    /// Queues `message` for broker `dest` (where its recipient lives now), from this broker's
    /// own chain. Call with the lock held; false (nothing queued) if no sequence could be had.
    fn forward_message(
        &self,
        s: &mut State,
        batch: &mut Batch,
        dest: BrokerId,
        message: federation::Message,
        now: u64,
    ) -> bool {
        let Ok(pos) = self.next_seq(s) else {
            return false;
        };
        let me = self.id();
        self.enqueue(
            s,
            batch,
            pos,
            Envelope::new(Dot::new(me, pos), dest, message, now),
        );
        s.last_arrival = s.last_arrival.max(pos);
        self.inner
            .counters
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Puts a message that arrived from the mesh into a local inbox, unless it must wait for
    /// its moved sender's old broker (see [`super::fence`]). Call with the lock held.
    fn put_inbox(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        m: &federation::Message,
        wait: Option<u64>,
    ) {
        if !self.fence_holds(s, batch, to, m, wait) {
            self.put_inbox_now(s, batch, to, m);
        }
    }

    /// Puts a message into a local inbox now, once per agent. Call with the lock held.
    pub(super) fn put_inbox_now(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        m: &federation::Message,
    ) {
        let seen = keys::seen(to, m.dot);
        let already =
            s.seen_now.contains(&seen) || self.inner.engine.get(&seen).ok().flatten().is_some();
        if already {
            self.inner
                .counters
                .duplicates
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        batch.put(seen.clone(), m.sent_at_ms.to_be_bytes().to_vec());
        s.seen_now.insert(seen);
        let Ok(pos) = self.next_seq(s) else { return };
        let mut m = m.clone();
        m.to = to.clone();
        inbox::put_unread(batch, to, pos, inbox::encode_message(&m));
        *s.unread.entry(to.clone()).or_default() += 1;
        s.last_arrival = s.last_arrival.max(pos);
        s.to_wake.push(to.clone());
        self.inner
            .counters
            .messages_stored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends `name`'s unread messages to broker `dest`, where it lives now. Call with the lock
    /// held; returns how many went.
    pub(super) fn forward_inbox(&self, s: &mut State, name: &AgentName, dest: BrokerId) -> u64 {
        let floor = Self::read_floor(s, name);
        let entries = match inbox::unread(&*self.inner.engine, name, floor, usize::MAX, usize::MAX)
        {
            Ok(u) => u.entries,
            Err(e) => {
                tracing::error!(error = %e, "cannot read an inbox to forward it");
                return 0;
            }
        };
        if entries.is_empty() && !s.parked.contains_key(name) {
            return 0;
        }
        let now = super::now_ms();
        let mut batch = Batch::new();
        let mut n = 0;
        let all = entries.len();
        for e in entries {
            // The inbox entry goes only if its copy is queued, in the same batch.
            if !self.forward_message(s, &mut batch, dest, e.message, now) {
                break;
            }
            inbox::remove(&mut batch, name, e.arrival);
            n += 1;
        }
        if n as usize == all {
            // Redirect markers that waited for the agent to leave follow its messages.
            self.forward_parked(s, &mut batch, name, dest);
        }
        if self.apply(s, batch).is_ok() {
            if let Some(u) = s.unread.get_mut(name) {
                *u = u.saturating_sub(n);
                if *u == 0 {
                    s.unread.remove(name);
                }
            }
            tracing::info!(agent = %name, to = %dest, messages = n, "forwarded unread messages to the agent's new broker");
            n
        } else {
            0
        }
    }

    /// Messages held here for names that have since registered on another broker go there.
    pub fn forward_held(&self) {
        let Some(mesh) = self.mesh_handle() else {
            return;
        };
        let mut s = self.state();
        let held: Vec<AgentName> = s
            .unread
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(n, _)| n)
            .chain(s.parked.keys())
            .filter(|n| s.agents.get(*n).is_none_or(|a| a.record.is_forward()))
            .cloned()
            .collect();
        let mut any = false;
        for name in held {
            if let Some(e) = mesh.lookup(name.as_str()) {
                if e.owner != self.id() {
                    any |= self.forward_inbox(&mut s, &name, e.owner) > 0;
                }
            }
        }
        drop(s);
        if any {
            self.commit().request();
        }
    }
}

/// The redirect marker `agent`'s copy of `env` waits for, if any.
fn wait_for(env: &Envelope, agent: &AgentName) -> Option<u64> {
    env.wait.iter().find(|(a, _)| a == agent).map(|(_, m)| *m)
}
