//! Inter-node messages: bincode 2 (serde) bodies in a versioned envelope. Types sent here have
//! no `skip_serializing_if` (bincode is not self-describing).

use crate::ledger::Totals;
use crate::record::GiftRecord;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on any incompatible change; a node refuses messages of another version.
pub const WIRE_VERSION: u16 = 1;
/// Largest inter-node message accepted (a sync reply carries a room's whole history).
pub const WIRE_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u16,
    body: T,
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<WIRE_BYTES_MAX>,
> {
    bincode::config::standard().with_limit::<WIRE_BYTES_MAX>()
}

pub fn encode<T: Serialize>(body: &T) -> bytes::Bytes {
    let env = Envelope {
        version: WIRE_VERSION,
        body,
    };
    bincode::serde::encode_to_vec(&env, config())
        .expect("wire types encode")
        .into()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (env, used): (Envelope<T>, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| format!("undecodable message: {e}"))?;
    if env.version != WIRE_VERSION {
        return Err(format!(
            "wire version {} (this node speaks {WIRE_VERSION})",
            env.version
        ));
    }
    if used != bytes.len() {
        return Err("trailing bytes after message".into());
    }
    Ok(env.body)
}

/// A fan-out round of a room, from its owner to every node (subject `gc.v1.room.<room>`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Events {
    pub room: String,
    pub epoch: String,
    pub live: bool,
    pub events: Vec<(u64, String)>,
}

/// Requests to a room's owner node.
#[derive(Debug, Serialize, Deserialize)]
pub enum RoomReq {
    Chat {
        user_id: String,
        name: String,
        text: String,
    },
    Announce {
        gift: GiftRecord,
        tier: u8,
    },
    Thanks {
        user_id: String,
        is_streamer: bool,
        gift_id: String,
        text: Option<String>,
    },
    StreamerSeen,
    Sync {
        since: Option<u64>,
    },
    Queue,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RoomResp {
    Seq(u64),
    Refused {
        code: String,
        message: String,
    },
    Sync {
        epoch: String,
        live: bool,
        seq: u64,
        complete: bool,
        events: Vec<(u64, String)>,
    },
    /// The thanks queue as JSON (it is only ever shown over HTTP).
    Queue(String),
}

/// Requests to a wallet's owner node.
#[derive(Debug, Serialize, Deserialize)]
pub enum WalletReq {
    Gift {
        user_id: String,
        user_name: String,
        gift_id: String,
        stream: String,
        sticker: String,
        count: u32,
        message: Option<String>,
    },
    Credit {
        user_id: String,
        coins: u64,
        reference: String,
    },
    Balance {
        user_id: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WalletResp {
    GiftOk { balance: u64, seq: u64 },
    GiftRejected { code: String, balance: Option<u64> },
    Credited { balance: u64 },
    CreditRefused { code: String, message: String },
    Balance(u64),
}

/// Requests every node answers about its own wallets.
#[derive(Debug, Serialize, Deserialize)]
pub enum AdminReq {
    Audit,
    Revenue { stream: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminResp {
    Audit {
        credited: u64,
        balances: u64,
        gifted: u64,
    },
    Revenue(RevenueParts),
}

/// One node's revenue of a stream, in parts that add up across nodes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RevenueParts {
    pub total: Totals,
    pub by_sticker: Vec<(String, Totals)>,
    pub by_gifter: Vec<(String, String, Totals)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let m = RoomReq::Chat {
            user_id: "u".into(),
            name: "U".into(),
            text: "hi".into(),
        };
        let bytes = encode(&m);
        assert!(matches!(
            decode::<RoomReq>(&bytes).unwrap(),
            RoomReq::Chat { .. }
        ));
        let other = bincode::serde::encode_to_vec(
            &Envelope {
                version: 99,
                body: &m,
            },
            config(),
        )
        .unwrap();
        assert!(decode::<RoomReq>(&other).unwrap_err().contains("version"));
        assert!(decode::<RoomReq>(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode::<RoomReq>(b"\xff\xff\xff\xff\xff").is_err());
    }
}
