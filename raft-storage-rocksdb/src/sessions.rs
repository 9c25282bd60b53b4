//! Client sessions ([`raft_core::session`]) stored beside the data.
//!
//! Each session is one checksummed record in the group's data, staged in
//! the batch of the write it records, so a session and the data it vouches
//! for are written atomically, travel in the same snapshots and survive the
//! same restarts. They live under keys that begin with the byte `0xFF`,
//! which starts no UTF-8 string: an application whose keys are UTF-8 (as
//! raft-kv's are) can never read or overwrite them; one with binary keys
//! must keep its keys out of the `0xFF` range.

use raft_core::session::{Session, SessionClock, SessionStore};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{open_record, seal_record};
use crate::legacy::Record;
use crate::state_machine::WriteView;

/// The prefix of every session record.
const SESSION_PREFIX: &[u8] = b"\xFFraft-session/s/";
/// The key of the session clock.
const CLOCK_KEY: &[u8] = b"\xFFraft-session/clock";

impl<R: DeserializeOwned> Record for Session<R> {}
impl Record for SessionClock {}

fn session_key(client_id: u64) -> Vec<u8> {
    let mut k = SESSION_PREFIX.to_vec();
    k.extend_from_slice(&client_id.to_be_bytes());
    k
}

/// The sessions of one apply batch: a [`SessionStore`] over its
/// [`WriteView`]. A record that fails its checksum or does not decode
/// fails the batch (the state machine stops rather than guess whether a
/// write was applied).
pub struct RocksSessions<'v, 'a> {
    view: &'v mut WriteView<'a>,
}

impl<'v, 'a> RocksSessions<'v, 'a> {
    /// The sessions as `view` sees them.
    pub fn new(view: &'v mut WriteView<'a>) -> Self {
        RocksSessions { view }
    }

    fn read<T: Record>(&mut self, key: &[u8], what: &str) -> Option<T> {
        let bytes = self.view.get(key)?;
        match open_record(key, &bytes) {
            Ok(v) => Some(v),
            Err(detail) => {
                let e = self.view.corrupt(format!("{what}: {detail}"));
                self.view.fail(e);
                None
            }
        }
    }

    fn write<T: Serialize>(&mut self, key: &[u8], value: &T, what: &str) {
        match seal_record(key, value) {
            Ok(bytes) => self.view.put(key, &bytes),
            Err(detail) => {
                let e = self.view.corrupt(format!("encoding {what}: {detail}"));
                self.view.fail(e);
            }
        }
    }
}

impl<R: Serialize + DeserializeOwned> SessionStore<R> for RocksSessions<'_, '_> {
    fn clock(&mut self) -> SessionClock {
        self.read(CLOCK_KEY, "session clock").unwrap_or_default()
    }

    fn set_clock(&mut self, clock: SessionClock) {
        self.write(CLOCK_KEY, &clock, "session clock");
    }

    fn load(&mut self, client_id: u64) -> Option<Session<R>> {
        self.read(
            &session_key(client_id),
            &format!("client session {client_id}"),
        )
    }

    fn save(&mut self, client_id: u64, session: &Session<R>) {
        let key = session_key(client_id);
        self.write(&key, session, &format!("client session {client_id}"));
    }

    fn remove_expired(&mut self, now_ms: u64) {
        for (key, bytes) in self.view.scan_prefix(SESSION_PREFIX) {
            match open_record::<Session<R>>(&key, &bytes) {
                Ok(s) if s.expired(now_ms) => self.view.delete(&key),
                Ok(_) => {}
                Err(detail) => {
                    let e = self
                        .view
                        .corrupt(format!("client session record: {detail}"));
                    self.view.fail(e);
                }
            }
        }
    }
}
