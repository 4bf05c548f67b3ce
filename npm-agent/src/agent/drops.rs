//! The agent's side of drop events: the dataplane's feed read on a thread of its own, handed
//! to the agent's loop, which names each event from its compiler ([`crate::drops::resolve`]),
//! counts it, logs it if asked, and publishes it to `npm-agent drops` readers.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use crate::dataplane::drops::{DropFeed, DropNotice};
use crate::drops::Hub;

/// How drop events are made, served and counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEventConfig {
    /// Events each CPU may send a second (0: none), and at once after a quiet time.
    pub per_second: u32,
    pub burst: u32,
    /// Where `npm-agent drops` reads them.
    pub socket: PathBuf,
    /// Count them by namespace and pod in the metrics.
    pub pod_labels: bool,
}

/// Events waiting for the agent's loop, at most. The kernel's limiter keeps the stream far
/// below this; if the loop is busy for long (a large compile), the rest are counted lost.
const QUEUE: usize = 4096;

/// The events between the reader thread and the agent's loop, and where they go.
pub struct DropPipe {
    pub(super) rx: Receiver<DropNotice>,
    pub(super) hub: Arc<Hub>,
    pub(super) log: bool,
}

/// Reads `feed` on a thread of its own until the agent's loop goes away.
pub fn spawn_reader(mut feed: Box<dyn DropFeed>, hub: Arc<Hub>, log: bool) -> DropPipe {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let spawned = std::thread::Builder::new().name("drop-events".into()).spawn(move || {
        read(feed.as_mut(), &tx);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to read drop events; none will be reported");
    }
    DropPipe { rx, hub, log }
}

fn read(feed: &mut dyn DropFeed, tx: &SyncSender<DropNotice>) {
    let mut failing = false;
    loop {
        match feed.wait(Duration::from_millis(500)) {
            Ok(notices) => {
                failing = false;
                for n in notices {
                    match tx.try_send(n) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            tracing::debug!("drop event queue full; event not reported");
                        }
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "reading drop events (retrying)");
                    failing = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
