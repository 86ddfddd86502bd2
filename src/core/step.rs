//! One core step's working set: the conversations a batch of messages can touch, loaded with a
//! handful of bulk queries, changed in memory message by message, and written back by
//! [`CoreTx::write_step`] with one statement per table.
//!
//! The maps are kept up to date as messages are handled, so a message that answers another
//! one of the same batch threads exactly as if each message had been its own step.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use crate::sla::clock::Target;
use crate::store::Error;
use crate::store::core::{ConversationRow, CoreTx, PendingMessage, StepWrites};
use crate::thread;

/// How many `In-Reply-To`/`References` ids of one message are looked up (nearest first).
pub(super) const MAX_ANCESTORS: usize = 50;

/// The ids a message names, nearest ancestor first: `In-Reply-To`, then `References` from the end.
pub(super) fn ancestors(m: &PendingMessage) -> impl Iterator<Item = &String> {
    m.in_reply_to
        .iter()
        .chain(m.references.iter().rev())
        .take(MAX_ANCESTORS)
}

/// What the step needs to know about one message before it looks anything up.
pub(super) struct Lookup<'a> {
    /// The message.
    pub message: &'a PendingMessage,
    /// `(client key, base subject)` when the subject fallback may decide.
    pub subject: Option<(String, String)>,
}

/// The in-memory state of one step.
#[derive(Default)]
pub(super) struct Step {
    /// Conversations loaded or created, by id.
    convs: HashMap<i64, ConversationRow>,
    /// Ids of conversations to write back.
    touched: BTreeSet<i64>,
    /// The highest conversation id when the step read its snapshot.
    base_id: i64,
    /// The id the next new conversation gets.
    next_id: i64,
    /// Message-ID -> conversation of the (earliest) processed message carrying it.
    pub by_message_id: HashMap<String, i64>,
    /// `(source, thread key)` -> conversation.
    pub by_thread_key: HashMap<(String, String), i64>,
    /// `(client key, base subject)` -> conversations.
    pub by_subject: HashMap<(String, String), Vec<i64>>,
    /// Targets created or changed, latest state per `(conversation, seq)`.
    targets: BTreeMap<(i64, u32), Target>,
    /// Conversations that received a message older than their clock: replayed before writing.
    replay: BTreeSet<i64>,
    /// Message -> conversation for the messages handled in this step.
    assigned: HashMap<i64, i64>,
    /// Everything else to write.
    writes: StepWrites,
}

impl Step {
    /// Loads what `batch` can touch: conversations named by its Message-IDs, thread keys and
    /// subjects (those last active at or after `since`).
    pub async fn load(
        tx: &mut CoreTx,
        batch: &[Lookup<'_>],
        since: DateTime<Utc>,
    ) -> Result<Step, Error> {
        let base_id = tx.max_conversation_id().await?;
        let mut step = Step {
            base_id,
            next_id: base_id + 1,
            ..Step::default()
        };
        let mut mids: Vec<&str> = batch
            .iter()
            .flat_map(|l| ancestors(l.message))
            .map(String::as_str)
            .collect();
        mids.sort_unstable();
        mids.dedup();
        for (mid, conv) in tx.conversations_by_message_ids(&mids).await? {
            // Rows come lowest message id first: the first one wins, as in a step per message.
            step.by_message_id.entry(mid).or_insert(conv);
        }
        let mut keys: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|l| {
                let m = l.message;
                m.thread_key.as_deref().map(|k| (m.source.as_str(), k))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        step.by_thread_key = tx
            .conversations_by_thread_keys(&keys)
            .await?
            .into_iter()
            .collect();
        let mut pairs: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|l| l.subject.as_ref().map(|(c, b)| (c.as_str(), b.as_str())))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let by_subject = tx.conversations_by_subjects(&pairs, since).await?;

        let mut ids: Vec<i64> = step
            .by_message_id
            .values()
            .chain(step.by_thread_key.values())
            .chain(&by_subject)
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for conv in tx.load_conversations(&ids).await? {
            step.convs.insert(conv.id, conv);
        }
        for id in by_subject {
            if let Some(c) = step.convs.get(&id) {
                let key = (c.client_key.clone(), c.base_subject.clone());
                step.by_subject.entry(key).or_default().push(id);
            }
        }
        Ok(step)
    }

    /// A step over already known conversations (deadline ticks and recomputation).
    pub fn with(convs: Vec<ConversationRow>) -> Step {
        Step {
            convs: convs.into_iter().map(|c| (c.id, c)).collect(),
            ..Step::default()
        }
    }

    /// The highest conversation id the step saw: new ones are numbered after it.
    pub fn base_id(&self) -> i64 {
        self.base_id
    }

    /// The ids of the loaded conversations, ascending.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.convs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Last activity of a loaded conversation.
    pub fn last_message_at(&self, id: i64) -> Option<DateTime<Utc>> {
        self.convs.get(&id).map(|c| c.last_message_at)
    }

    /// Takes a conversation out to change it; [`Step::put`] brings it back.
    pub fn take(&mut self, id: i64) -> Option<ConversationRow> {
        self.convs.remove(&id)
    }

    /// A fresh id for a new conversation.
    pub fn new_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Puts a changed conversation back, to be written, and keeps the lookups current.
    pub fn put(&mut self, conv: ConversationRow) {
        let subject = (conv.client_key.clone(), conv.base_subject.clone());
        let list = self.by_subject.entry(subject).or_default();
        if !list.contains(&conv.id) {
            list.push(conv.id);
        }
        self.touched.insert(conv.id);
        self.convs.insert(conv.id, conv);
    }

    /// Records a target's new state.
    pub fn save_target(&mut self, conversation: i64, target: &Target) {
        self.targets
            .insert((conversation, target.seq), target.clone());
    }

    /// Records a provider thread key of a conversation (the first one wins).
    pub fn add_thread_key(&mut self, source: &str, key: &str, conversation: i64) {
        let k = (source.to_string(), key.to_string());
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_thread_key.entry(k) {
            e.insert(conversation);
            self.writes
                .thread_keys
                .push((source.to_string(), key.to_string(), conversation));
        }
    }

    /// Marks a message handled; its Message-ID now leads to its conversation.
    pub fn processed(&mut self, m: &PendingMessage, conversation: Option<i64>) {
        if let (Some(mid), Some(conv)) = (&m.message_id, conversation) {
            self.by_message_id.entry(mid.clone()).or_insert(conv);
        }
        if let Some(conv) = conversation {
            self.assigned.insert(m.id, conv);
        }
        self.writes.processed.push((m.id, conversation));
    }

    /// The conversation a message of this step went to.
    pub fn assigned(&self, message: i64) -> Option<i64> {
        self.assigned.get(&message).copied()
    }

    /// Asks for a conversation's clock to be rebuilt from its whole message log.
    pub fn needs_replay(&mut self, conversation: i64) {
        self.replay.insert(conversation);
    }

    /// The conversations to replay (emptied).
    pub fn take_replays(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.replay).into_iter().collect()
    }

    /// Drops a conversation's targets numbered above `keep` (a replay found fewer).
    pub fn truncate_targets(&mut self, conversation: i64, keep: u32) {
        self.targets
            .retain(|&(conv, seq), _| conv != conversation || seq <= keep);
        self.writes.truncated.push((conversation, keep));
    }

    /// Queues a warn or breach event.
    pub fn alert(&mut self, key: String, event: crate::digest::AlertEvent, at: DateTime<Utc>) {
        self.writes.alerts.push((key, event, at));
    }

    /// What the step writes.
    pub fn finish(mut self) -> StepWrites {
        let mut w = std::mem::take(&mut self.writes);
        // Conversations first: targets and keys refer to them.
        w.conversations = std::mem::take(&mut self.touched)
            .into_iter()
            .filter_map(|id| self.convs.remove(&id))
            .collect();
        w.targets = std::mem::take(&mut self.targets)
            .into_iter()
            .map(|((conv, _), t)| (conv, t))
            .collect();
        w
    }
}

/// The earliest `since` of a batch's subject window.
pub(super) fn subject_since(batch: &[PendingMessage]) -> DateTime<Utc> {
    batch
        .iter()
        .map(|m| m.received_at)
        .min()
        .and_then(|t| t.checked_sub_signed(thread::SUBJECT_WINDOW))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}
