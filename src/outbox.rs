//! Outboxes: envelopes waiting for other brokers, and the delivery clock, in the storage engine.
//!
//! An envelope for broker D sits under `o` + D + position until D (or the relay carrying it
//! there) acknowledges it; positions come from the broker's one sequence, so each outbox is
//! in send order. The clock of what was delivered here is stored per origin under `c`, in the
//! same batch as the inbox writes it accounts for.

use std::collections::BTreeMap;

use federation::clock::OriginClock;
use federation::delivery::Envelope;
use federation::{BrokerId, DeliveryClock};

use crate::error::{Error, Result};
use crate::storage::{keys, Engine};

pub fn prefix(dest: BrokerId) -> Vec<u8> {
    let mut k = vec![keys::OUTBOX];
    k.extend_from_slice(&dest.as_u32().to_be_bytes());
    k
}

pub fn key(dest: BrokerId, pos: u64) -> Vec<u8> {
    let mut k = prefix(dest);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

/// The destination and position of an outbox key.
pub fn parse_key(k: &[u8]) -> Option<(BrokerId, u64)> {
    if k.len() != 13 || k[0] != keys::OUTBOX {
        return None;
    }
    let dest = u32::from_be_bytes(k[1..5].try_into().ok()?);
    let pos = u64::from_be_bytes(k[5..13].try_into().ok()?);
    Some((BrokerId::from_u32(dest), pos))
}

pub fn chain_key(dest: BrokerId) -> Vec<u8> {
    let mut k = vec![keys::CHAIN];
    k.extend_from_slice(&dest.as_u32().to_be_bytes());
    k
}

/// The key of an envelope waiting in the reorder buffer.
pub fn pending_key(origin: BrokerId, seq: u64) -> Vec<u8> {
    let mut k = pending_prefix(origin);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn pending_prefix(origin: BrokerId) -> Vec<u8> {
    let mut k = vec![keys::PENDING];
    k.extend_from_slice(&origin.as_u32().to_be_bytes());
    k
}

pub fn clock_key(origin: BrokerId) -> Vec<u8> {
    let mut k = vec![keys::CLOCK];
    k.extend_from_slice(&origin.as_u32().to_be_bytes());
    k
}

pub fn member_key(id: BrokerId) -> Vec<u8> {
    let mut k = vec![keys::MEMBER];
    k.extend_from_slice(&id.as_u32().to_be_bytes());
    k
}

/// The brokers this one has linked with, and their addresses.
pub fn load_members(engine: &dyn Engine) -> Result<BTreeMap<BrokerId, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in engine.scan(&[keys::MEMBER], None, usize::MAX)? {
        if let Ok(id) = <[u8; 4]>::try_from(&k[1..]) {
            out.insert(
                BrokerId::from_u32(u32::from_be_bytes(id)),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    Ok(out)
}

pub fn decode(v: &[u8]) -> Result<Envelope> {
    federation::wire::decode(v).map_err(|e| Error::Storage(format!("corrupt envelope: {e}")))
}

/// The persisted delivery clock.
pub fn load_clock(engine: &dyn Engine) -> Result<DeliveryClock> {
    let mut origins = Vec::new();
    for (k, v) in engine.scan(&[keys::CLOCK], None, usize::MAX)? {
        let id: [u8; 4] = k[1..]
            .try_into()
            .map_err(|_| Error::Storage("corrupt clock key".into()))?;
        let o: OriginClock = federation::wire::decode(&v)
            .map_err(|e| Error::Storage(format!("corrupt clock: {e}")))?;
        origins.push((BrokerId::from_u32(u32::from_be_bytes(id)), o));
    }
    Ok(DeliveryClock::from_origins(origins))
}

/// Envelopes waiting per destination, and the last sequence queued for each.
pub fn load_depths(
    engine: &dyn Engine,
) -> Result<(BTreeMap<BrokerId, u64>, BTreeMap<BrokerId, u64>)> {
    let mut depths: BTreeMap<BrokerId, u64> = BTreeMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = engine.scan(&[keys::OUTBOX], after.as_deref(), 4096)?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        for (k, _) in &page {
            if let Some((dest, _)) = parse_key(k) {
                *depths.entry(dest).or_default() += 1;
            }
        }
    }
    let mut chains = BTreeMap::new();
    for (k, v) in engine.scan(&[keys::CHAIN], None, usize::MAX)? {
        if let (Ok(id), Ok(seq)) = (<[u8; 4]>::try_from(&k[1..]), <[u8; 8]>::try_from(&v[..])) {
            chains.insert(
                BrokerId::from_u32(u32::from_be_bytes(id)),
                u64::from_be_bytes(seq),
            );
        }
    }
    Ok((depths, chains))
}

/// Up to `limit` envelopes for `dest` after position `after` and at most at `visible`.
pub fn read(
    engine: &dyn Engine,
    dest: BrokerId,
    after: u64,
    visible: u64,
    limit: usize,
) -> Result<Vec<(u64, Envelope)>> {
    let start = key(dest, after);
    let page = engine.scan(&prefix(dest), Some(&start), limit)?;
    let mut out = Vec::with_capacity(page.len());
    for (k, v) in page {
        let Some((_, pos)) = parse_key(&k) else {
            continue;
        };
        if pos > visible {
            break;
        }
        out.push((pos, decode(&v)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_sort_by_position() {
        let d = BrokerId::from_u32(0xabcdef01);
        let k = key(d, 300);
        assert_eq!(parse_key(&k), Some((d, 300)));
        assert!(key(d, 2) < key(d, 300));
        assert!(k.starts_with(&prefix(d)));
    }
}
