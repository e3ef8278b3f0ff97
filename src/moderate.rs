//! The moderation frames: who may act (the stream's streamer, or a moderator it named), what
//! each action does to the room's state (`hub::Moderation`), and the room event it publishes.
//!
//! Rules, as on the big platforms: only the streamer names and removes moderators; nobody acts
//! on the streamer; a moderator does not act on another moderator (or delete their chat), only
//! the streamer does; nobody acts on themselves. A refused action changes nothing.
//!
//! Lock order: the moderation lock is released before the room publishes or closes members
//! (the room lock is taken first only in `Room::join`).

use crate::app::{is_streamer, App};
use crate::auth::Claims;
use crate::hub::{LimitReached, Room};
use crate::limits::{ID_CHARS_MAX, SLOW_MODE_SECS_MAX, TIMEOUT_SECS_MAX};
use crate::protocol::{self, valid_id, ClientFrame};

/// A refusal: the error code and its message.
pub type Refusal = (&'static str, String);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Authority {
    Streamer,
    Moderator,
}

fn forbidden(message: &str) -> Refusal {
    ("forbidden", message.to_string())
}

fn limit(what: &str, max: usize) -> Refusal {
    (
        "limit_reached",
        format!("this stream has the most {what} allowed ({max})"),
    )
}

impl App {
    /// One moderation frame from `user` in `room`. `Ok` when applied (the room sees its event);
    /// other frames are not moderation and are refused as `bad_frame`.
    pub fn moderate(&self, user: &Claims, room: &Room, frame: &ClientFrame) -> Result<(), Refusal> {
        let authority = if is_streamer(user, room) {
            Authority::Streamer
        } else if room.moderation().is_moderator(&user.sub) {
            Authority::Moderator
        } else {
            return Err(forbidden(
                "only this stream's streamer or its moderators may moderate",
            ));
        };
        let ts = crate::now_ms();
        match frame {
            ClientFrame::Delete { seq: target } => {
                let author = room.chat_author(*target).ok_or((
                    "not_found",
                    "no chat message with that seq in this stream's recent history".to_string(),
                ))?;
                if authority == Authority::Moderator && *author != *user.sub {
                    let m = room.moderation();
                    if *author == *room.id || m.is_moderator(&author) {
                        return Err(forbidden(
                            "only the streamer may delete the streamer's or a moderator's chat",
                        ));
                    }
                }
                if !room.moderation().mark_deleted(*target) {
                    return Err(("not_found", "that chat message is deleted already".into()));
                }
                room.publish(|seq| {
                    serde_json::to_string(&protocol::DeletedEvent {
                        kind: "deleted",
                        seq,
                        target_seq: *target,
                        ts,
                    })
                    .expect("deleted serialises")
                });
            }
            ClientFrame::Timeout { user_id, secs } => {
                self.check_target(user, room, authority, user_id)?;
                if *secs > TIMEOUT_SECS_MAX {
                    return Err((
                        "invalid",
                        format!("secs must be 0-{TIMEOUT_SECS_MAX} (0 lifts a timeout)"),
                    ));
                }
                room.moderation()
                    .timeout(user_id, ts.saturating_add(secs * 1000), ts)
                    .map_err(|LimitReached| limit("timeouts", crate::limits::ROOM_TIMEOUTS_MAX))?;
                publish_action(room, "timeout", user_id, Some(*secs), ts);
            }
            ClientFrame::Ban { user_id } => {
                self.check_target(user, room, authority, user_id)?;
                let changed = {
                    let mut m = room.moderation();
                    let changed = m
                        .ban(user_id)
                        .map_err(|LimitReached| limit("bans", crate::limits::ROOM_BANS_MAX))?;
                    m.remove_moderator(user_id);
                    changed
                };
                room.kick_user(
                    user_id,
                    &protocol::error_frame("banned", "you are banned from this stream"),
                    4010,
                    "banned",
                );
                if changed {
                    publish_action(room, "ban", user_id, None, ts);
                }
            }
            ClientFrame::Unban { user_id } => {
                self.check_target(user, room, authority, user_id)?;
                if room.moderation().unban(user_id) {
                    publish_action(room, "unban", user_id, None, ts);
                }
            }
            ClientFrame::Mod { user_id } | ClientFrame::Unmod { user_id } => {
                if authority != Authority::Streamer {
                    return Err(forbidden("only the streamer names or removes moderators"));
                }
                self.check_target(user, room, authority, user_id)?;
                let adding = matches!(frame, ClientFrame::Mod { .. });
                let changed = {
                    let mut m = room.moderation();
                    if adding {
                        if m.is_banned(user_id) {
                            return Err(("invalid", "unban that user first".into()));
                        }
                        m.add_moderator(user_id).map_err(|LimitReached| {
                            limit("moderators", crate::limits::ROOM_MODERATORS_MAX)
                        })?
                    } else {
                        m.remove_moderator(user_id)
                    }
                };
                if changed {
                    publish_action(
                        room,
                        if adding { "mod" } else { "unmod" },
                        user_id,
                        None,
                        ts,
                    );
                }
            }
            ClientFrame::SlowMode { secs } => {
                if *secs > SLOW_MODE_SECS_MAX {
                    return Err((
                        "invalid",
                        format!("secs must be 0-{SLOW_MODE_SECS_MAX} (0 turns slow mode off)"),
                    ));
                }
                room.moderation().set_slow_mode(*secs);
                publish_settings(room, ts);
            }
            ClientFrame::BlockedWords { words } => {
                room.moderation()
                    .set_blocked_words(words)
                    .map_err(|e| ("invalid", e))?;
                publish_settings(room, ts);
            }
            _ => return Err(("bad_frame", "not a moderation frame".into())),
        }
        Ok(())
    }

    /// The target of a user action: a valid id, not the streamer, not oneself, and for a
    /// moderator, not another moderator.
    fn check_target(
        &self,
        user: &Claims,
        room: &Room,
        authority: Authority,
        target: &str,
    ) -> Result<(), Refusal> {
        if !valid_id(target, ID_CHARS_MAX) {
            return Err(("invalid", "user_id must be 1-64 of [A-Za-z0-9_-]".into()));
        }
        if *target == *room.id {
            return Err(forbidden(
                "the streamer cannot be moderated in their own stream",
            ));
        }
        if *target == *user.sub {
            return Err(("invalid", "you cannot moderate yourself".into()));
        }
        if authority == Authority::Moderator && room.moderation().is_moderator(target) {
            return Err(forbidden("only the streamer acts on a moderator"));
        }
        Ok(())
    }
}

fn publish_action(room: &Room, action: &'static str, user_id: &str, secs: Option<u64>, ts: u64) {
    room.publish(|seq| {
        serde_json::to_string(&protocol::ModActionEvent {
            kind: "mod_action",
            seq,
            action,
            user_id,
            secs,
            ts,
        })
        .expect("mod_action serialises")
    });
}

fn publish_settings(room: &Room, ts: u64) {
    let (slow_mode, blocked_words) = {
        let m = room.moderation();
        (m.slow_mode_secs(), m.blocked_words_count())
    };
    room.publish(|seq| {
        serde_json::to_string(&protocol::RoomSettingsEvent {
            kind: "room_settings",
            seq,
            slow_mode,
            blocked_words,
            ts,
        })
        .expect("room_settings serialises")
    });
}
