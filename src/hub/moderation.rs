//! A room's moderation state: moderators, bans, timeouts, slow mode, blocked words, deleted
//! messages. In memory only (a restart clears it), every collection bounded by a constant of
//! `limits.rs`. Pure data and rules: who may act is decided by the app (`moderate.rs`).

use crate::limits::{
    BLOCKED_WORDS_MAX, BLOCKED_WORD_CHARS_MAX, ROOM_BANS_MAX, ROOM_DELETED_TRACKED_MAX,
    ROOM_MODERATORS_MAX, ROOM_TIMEOUTS_MAX, SLOW_MODE_TRACKED_MAX,
};
use std::collections::{HashMap, HashSet, VecDeque};

/// Why a user may not speak (chat or gift) in a room: the refusal's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Banned,
    TimedOut,
    Blocked,
    SlowMode,
}

impl Gate {
    pub fn code(self) -> &'static str {
        match self {
            Gate::Banned => "banned",
            Gate::TimedOut => "timed_out",
            Gate::Blocked => "blocked",
            Gate::SlowMode => "slow_mode",
        }
    }
}

/// A bounded list is full.
#[derive(Debug, PartialEq, Eq)]
pub struct LimitReached;

#[derive(Debug, Default)]
pub struct Moderation {
    moderators: HashSet<String>,
    bans: HashSet<String>,
    /// User → end of the timeout, ms since the epoch.
    timeouts: HashMap<String, u64>,
    slow_mode_secs: u64,
    /// User → time of the last accepted chat, ms (only while slow mode is on).
    last_chat_ms: HashMap<String, u64>,
    /// Lowercased.
    blocked_words: HashSet<String>,
    deleted: VecDeque<u64>,
}

impl Moderation {
    pub fn is_moderator(&self, user_id: &str) -> bool {
        self.moderators.contains(user_id)
    }

    pub fn is_banned(&self, user_id: &str) -> bool {
        self.bans.contains(user_id)
    }

    pub fn slow_mode_secs(&self) -> u64 {
        self.slow_mode_secs
    }

    pub fn blocked_words_count(&self) -> usize {
        self.blocked_words.len()
    }

    /// Returns whether it changed.
    pub fn add_moderator(&mut self, user_id: &str) -> Result<bool, LimitReached> {
        if self.moderators.contains(user_id) {
            return Ok(false);
        }
        if self.moderators.len() >= ROOM_MODERATORS_MAX {
            return Err(LimitReached);
        }
        Ok(self.moderators.insert(user_id.to_string()))
    }

    pub fn remove_moderator(&mut self, user_id: &str) -> bool {
        self.moderators.remove(user_id)
    }

    /// Bans (and forgets any timeout, which the ban supersedes).
    pub fn ban(&mut self, user_id: &str) -> Result<bool, LimitReached> {
        if self.bans.contains(user_id) {
            return Ok(false);
        }
        if self.bans.len() >= ROOM_BANS_MAX {
            return Err(LimitReached);
        }
        self.timeouts.remove(user_id);
        Ok(self.bans.insert(user_id.to_string()))
    }

    pub fn unban(&mut self, user_id: &str) -> bool {
        self.bans.remove(user_id)
    }

    /// Times `user_id` out until `until_ms`; `until_ms <= now_ms` lifts a timeout.
    pub fn timeout(
        &mut self,
        user_id: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), LimitReached> {
        if until_ms <= now_ms {
            self.timeouts.remove(user_id);
            return Ok(());
        }
        if !self.timeouts.contains_key(user_id) && self.timeouts.len() >= ROOM_TIMEOUTS_MAX {
            self.timeouts.retain(|_, until| *until > now_ms);
            if self.timeouts.len() >= ROOM_TIMEOUTS_MAX {
                return Err(LimitReached);
            }
        }
        self.timeouts.insert(user_id.to_string(), until_ms);
        Ok(())
    }

    pub fn timed_out(&self, user_id: &str, now_ms: u64) -> bool {
        self.timeouts
            .get(user_id)
            .is_some_and(|until| *until > now_ms)
    }

    pub fn set_slow_mode(&mut self, secs: u64) {
        self.slow_mode_secs = secs;
        if secs == 0 {
            self.last_chat_ms = HashMap::new();
        }
    }

    /// Replaces the blocked words. Each must be 1..=`BLOCKED_WORD_CHARS_MAX` letters or digits
    /// (a whole word); at most `BLOCKED_WORDS_MAX`. All or nothing.
    pub fn set_blocked_words(&mut self, words: &[String]) -> Result<(), String> {
        if words.len() > BLOCKED_WORDS_MAX {
            return Err(format!("at most {BLOCKED_WORDS_MAX} blocked words"));
        }
        let mut set = HashSet::with_capacity(words.len());
        for w in words {
            let w = w.trim();
            let chars = w.chars().count();
            if chars == 0 || chars > BLOCKED_WORD_CHARS_MAX || !w.chars().all(char::is_alphanumeric)
            {
                return Err(format!(
                    "each blocked word must be 1-{BLOCKED_WORD_CHARS_MAX} letters or digits"
                ));
            }
            set.insert(w.to_lowercase());
        }
        self.blocked_words = set;
        Ok(())
    }

    /// Whether `text` contains a blocked word: whole words (split at anything that is not a
    /// letter or digit), compared case-insensitively.
    pub fn contains_blocked(&self, text: &str) -> bool {
        if self.blocked_words.is_empty() {
            return false;
        }
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty() && w.chars().count() <= BLOCKED_WORD_CHARS_MAX)
            .any(|w| self.blocked_words.contains(&w.to_lowercase()))
    }

    /// Bans, timeouts and (for `text`) blocked words: may this user say this? `exempt` users
    /// (the streamer, moderators) pass the blocked words.
    pub fn gate(
        &self,
        user_id: &str,
        text: Option<&str>,
        exempt: bool,
        now_ms: u64,
    ) -> Result<(), Gate> {
        if self.is_banned(user_id) {
            return Err(Gate::Banned);
        }
        if self.timed_out(user_id, now_ms) {
            return Err(Gate::TimedOut);
        }
        if !exempt && text.is_some_and(|t| self.contains_blocked(t)) {
            return Err(Gate::Blocked);
        }
        Ok(())
    }

    /// Slow mode: whether `user_id` may chat now (not before `slow_mode_secs` after its last
    /// accepted chat). Does not record; [`Moderation::chat_accepted`] does.
    pub fn slow_mode_allows(&self, user_id: &str, now_ms: u64) -> bool {
        if self.slow_mode_secs == 0 {
            return true;
        }
        self.last_chat_ms
            .get(user_id)
            .is_none_or(|last| now_ms.saturating_sub(*last) >= self.slow_mode_secs * 1000)
    }

    /// Records an accepted chat for slow mode.
    pub fn chat_accepted(&mut self, user_id: &str, now_ms: u64) {
        if self.slow_mode_secs == 0 {
            return;
        }
        if self.last_chat_ms.len() >= SLOW_MODE_TRACKED_MAX
            && !self.last_chat_ms.contains_key(user_id)
        {
            let window = self.slow_mode_secs * 1000;
            self.last_chat_ms
                .retain(|_, last| now_ms.saturating_sub(*last) < window);
            if self.last_chat_ms.len() >= SLOW_MODE_TRACKED_MAX {
                self.last_chat_ms.clear();
            }
        }
        self.last_chat_ms.insert(user_id.to_string(), now_ms);
    }

    /// Remembers a deleted seq; `false` if it was deleted already.
    pub fn mark_deleted(&mut self, seq: u64) -> bool {
        if self.deleted.contains(&seq) {
            return false;
        }
        if self.deleted.len() >= ROOM_DELETED_TRACKED_MAX {
            self.deleted.pop_front();
        }
        self.deleted.push_back(seq);
        true
    }

    /// The lists, for the streamer's `GET /api/streams/{id}/moderation`.
    pub fn snapshot(&self, now_ms: u64) -> serde_json::Value {
        let mut moderators: Vec<&String> = self.moderators.iter().collect();
        moderators.sort();
        let mut banned: Vec<&String> = self.bans.iter().collect();
        banned.sort();
        let mut timeouts: Vec<(&String, &u64)> =
            self.timeouts.iter().filter(|(_, u)| **u > now_ms).collect();
        timeouts.sort();
        let mut words: Vec<&String> = self.blocked_words.iter().collect();
        words.sort();
        serde_json::json!({
            "moderators": moderators,
            "banned": banned,
            "timeouts": timeouts
                .into_iter()
                .map(|(u, until)| serde_json::json!({"user_id": u, "until": until}))
                .collect::<Vec<_>>(),
            "slow_mode": self.slow_mode_secs,
            "blocked_words": words,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moderators_are_bounded_at_the_edge() {
        let mut m = Moderation::default();
        for i in 0..ROOM_MODERATORS_MAX {
            assert_eq!(m.add_moderator(&format!("m{i}")), Ok(true));
        }
        assert_eq!(
            m.add_moderator("m0"),
            Ok(false),
            "present already: no change"
        );
        assert_eq!(m.add_moderator("one-more"), Err(LimitReached));
        assert!(m.remove_moderator("m0"));
        assert_eq!(m.add_moderator("one-more"), Ok(true));
    }

    #[test]
    fn bans_are_bounded_at_the_edge() {
        let mut m = Moderation::default();
        for i in 0..ROOM_BANS_MAX {
            m.ban(&format!("u{i}")).unwrap();
        }
        assert_eq!(m.ban("one-more"), Err(LimitReached));
        assert!(m.unban("u1"));
        assert_eq!(m.ban("one-more"), Ok(true));
        assert!(m.is_banned("one-more") && !m.is_banned("u1"));
    }

    #[test]
    fn timeouts_are_bounded_and_expired_ones_make_room() {
        let mut m = Moderation::default();
        for i in 0..ROOM_TIMEOUTS_MAX {
            m.timeout(&format!("u{i}"), 2_000, 1_000).unwrap();
        }
        assert_eq!(m.timeout("one-more", 2_000, 1_000), Err(LimitReached));
        // Re-timing one already there is not growth.
        assert_eq!(m.timeout("u0", 3_000, 1_000), Ok(()));
        // Once they expired, there is room.
        assert_eq!(m.timeout("one-more", 9_000, 5_000), Ok(()));
        assert!(m.timed_out("one-more", 5_000) && !m.timed_out("u1", 5_000));
        // until <= now lifts it.
        m.timeout("one-more", 0, 5_000).unwrap();
        assert!(!m.timed_out("one-more", 5_000));
    }

    #[test]
    fn blocked_words_edges() {
        let mut m = Moderation::default();
        let max: Vec<String> = (0..BLOCKED_WORDS_MAX).map(|i| format!("w{i}")).collect();
        assert!(m.set_blocked_words(&max).is_ok());
        let mut over = max.clone();
        over.push("extra".into());
        assert!(m.set_blocked_words(&over).is_err());
        assert_eq!(
            m.blocked_words_count(),
            BLOCKED_WORDS_MAX,
            "refused list changes nothing"
        );
        let long = "x".repeat(BLOCKED_WORD_CHARS_MAX);
        assert!(m.set_blocked_words(std::slice::from_ref(&long)).is_ok());
        assert!(m
            .set_blocked_words(&["x".repeat(BLOCKED_WORD_CHARS_MAX + 1)])
            .is_err());
        assert!(m.set_blocked_words(&["two words".into()]).is_err());
        assert!(m.set_blocked_words(&["".into()]).is_err());
        m.set_blocked_words(&["Spoiler".into(), "ÉTÉ".into()])
            .unwrap();
        assert!(m.contains_blocked("no SPOILERS? a spoiler!"));
        assert!(m.contains_blocked("cet été"));
        assert!(!m.contains_blocked("spoilers are fine"), "whole words only");
        assert!(!m.contains_blocked("unspoiler"));
        assert_eq!(m.gate("u", Some("spoiler"), false, 0), Err(Gate::Blocked));
        assert_eq!(m.gate("u", Some("spoiler"), true, 0), Ok(()));
    }

    #[test]
    fn slow_mode_lets_one_chat_per_interval() {
        let mut m = Moderation::default();
        assert!(m.slow_mode_allows("u", 0));
        m.set_slow_mode(10);
        assert!(m.slow_mode_allows("u", 1_000));
        m.chat_accepted("u", 1_000);
        assert!(!m.slow_mode_allows("u", 10_999));
        assert!(m.slow_mode_allows("u", 11_000));
        assert!(m.slow_mode_allows("v", 1_001));
        m.set_slow_mode(0);
        assert!(m.slow_mode_allows("u", 1_001));
    }

    #[test]
    fn a_seq_is_deleted_once() {
        let mut m = Moderation::default();
        assert!(m.mark_deleted(5));
        assert!(!m.mark_deleted(5));
        for s in 100..100 + ROOM_DELETED_TRACKED_MAX as u64 {
            m.mark_deleted(s);
        }
        assert_eq!(m.deleted.len(), ROOM_DELETED_TRACKED_MAX);
    }
}
