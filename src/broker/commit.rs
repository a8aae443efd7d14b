//! Group commit: one flush makes every write before it durable, so concurrent writers share it.
//!
//! 1. A writer applies its batch under the broker lock, which bumps the write epoch.
//! 2. It calls [`Commit::request`] and waits until the durable epoch reaches its own.
//! 3. The flusher task wakes, notes the latest epoch (and message position) written, flushes
//!    once, and publishes both as durable. Everyone whose write came before the flush began
//!    is released together; writes that arrived during it wait for the next flush.
//!
//! The batch size therefore follows the load: one writer gets one flush per write, a thousand
//! concurrent writers share a handful.

use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::error::ErrorKind;
use crate::error::WireError;

/// What is known durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// Every write with an epoch at or below this is on disk.
    pub epoch: u64,
    /// Every inbox or outbox entry at a position at or below this is on disk: outboxes stream
    /// only these, and a read that marks nothing waits for its entries to be.
    pub arrival: u64,
    /// Set once a flush has failed: the broker can no longer promise durability.
    pub failed: bool,
}

/// The handle writers use.
#[derive(Clone)]
pub struct Commit {
    wake: Arc<Notify>,
    durable: watch::Receiver<Durable>,
}

impl Commit {
    pub fn new(initial: Durable) -> (Commit, Arc<Notify>, watch::Sender<Durable>) {
        let wake = Arc::new(Notify::new());
        let (tx, rx) = watch::channel(initial);
        (
            Commit {
                wake: wake.clone(),
                durable: rx,
            },
            wake,
            tx,
        )
    }

    /// Asks the flusher to make everything written so far durable.
    pub fn request(&self) {
        self.wake.notify_one();
    }

    /// The latest durable position.
    pub fn durable(&self) -> Durable {
        *self.durable.borrow()
    }

    /// Waits until `epoch` is durable.
    pub async fn wait(&self, epoch: u64) -> Result<(), WireError> {
        self.request();
        let mut rx = self.durable.clone();
        let d = rx
            .wait_for(|d| d.epoch >= epoch || d.failed)
            .await
            .map_err(|_| unavailable())?;
        if d.epoch >= epoch {
            Ok(())
        } else {
            Err(unavailable())
        }
    }

    /// Subscribes to durability changes (for waking readers).
    pub fn subscribe(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }
}

/// The error a reply gets when the write it answers for can no longer become durable.
pub(super) fn unavailable() -> WireError {
    WireError::new(
        ErrorKind::Unavailable,
        "the broker could not make the write durable (storage failed or shutting down); retry",
    )
}
