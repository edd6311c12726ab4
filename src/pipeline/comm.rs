//! Messages between roles, and the two ways they travel: a queue inside one process, or MPI
//! between ranks (host-staged: every message is serialised into host memory).
//!
//! On the wire a message is one MPI message of bytes: a 16-byte header (magic, kind, payload
//! length) and the bincode payload. The receiver checks the byte count it received against the
//! header, and the payload against the kind, and reports a mismatch as an error naming the
//! sender instead of decoding garbage.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::report::RoleTimes;
use super::unit::{FrameTicket, UnitInput, UnitOutput};

/// What roles say to each other.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// Reader → coordinator: give me a frame.
    ReqFrame,
    /// Coordinator → reader: this frame (index in the list), or none left.
    Frame(Option<usize>),
    /// Compute → reader: give me a unit.
    ReqWork,
    /// Reader → compute: a unit, and the writer rank its output goes to.
    Work(Box<UnitInput>, usize),
    /// Reader → compute: no more units.
    NoWork,
    /// Reader → writer: a frame whose units are being handed out.
    Ticket(Box<FrameTicket>),
    /// Reader → writer: a frame that could not be read or cut.
    FrameFailed(usize, String),
    /// Compute → writer: a computed unit.
    Output(Box<UnitOutput>),
    /// Compute → writers of its node: it will send no more outputs.
    ComputeDone,
    /// Reader → writers of its node: it will send no more tickets.
    ReaderDone,
    /// Every rank → rank 0, at the end.
    Summary(Box<RankSummary>),
}

impl Msg {
    fn kind(&self) -> u32 {
        match self {
            Msg::ReqFrame => 1,
            Msg::Frame(_) => 2,
            Msg::ReqWork => 3,
            Msg::Work(..) => 4,
            Msg::NoWork => 5,
            Msg::Ticket(_) => 6,
            Msg::FrameFailed(..) => 7,
            Msg::Output(_) => 8,
            Msg::ComputeDone => 9,
            Msg::ReaderDone => 10,
            Msg::Summary(_) => 11,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::ReqFrame => "frame request",
            Msg::Frame(_) => "frame",
            Msg::ReqWork => "work request",
            Msg::Work(..) => "work unit",
            Msg::NoWork => "no-more-work",
            Msg::Ticket(_) => "frame ticket",
            Msg::FrameFailed(..) => "frame failure",
            Msg::Output(_) => "unit output",
            Msg::ComputeDone => "compute done",
            Msg::ReaderDone => "reader done",
            Msg::Summary(_) => "rank summary",
        }
    }
}

/// What a rank reports at the end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RankSummary {
    /// Its time split.
    pub times: RoleTimes,
    /// Frames it wrote (list indices).
    pub written: Vec<usize>,
    /// Frames that failed, with why.
    pub failed: Vec<(usize, String)>,
    /// Pixel bytes of the units it cut, per frame cut.
    pub unit_bytes: Vec<(usize, u64)>,
}

const MAGIC: u32 = 0x5350_5854; // "SPXT"
const HEADER: usize = 16;

/// Serialises `msg` with its header.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, String> {
    let payload = bincode::serialize(msg).map_err(|e| format!("encoding a {}: {e}", msg.name()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&msg.kind().to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header of `bytes` (from rank `from`) against what arrived, then decodes.
pub fn decode(bytes: &[u8], from: usize) -> Result<Msg, String> {
    if bytes.len() < HEADER {
        return Err(format!(
            "rank {from} sent a {}-byte message, shorter than the {HEADER}-byte header",
            bytes.len()
        ));
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC {
        return Err(format!(
            "rank {from} sent a message without spextract's header"
        ));
    }
    let kind = word(4);
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    if bytes.len() - HEADER != len {
        return Err(format!(
            "rank {from}: received {} payload bytes but the header of this kind-{kind} message \
             says {len}",
            bytes.len() - HEADER
        ));
    }
    let msg: Msg = bincode::deserialize(&bytes[HEADER..]).map_err(|e| {
        format!("rank {from}: a kind-{kind} message of {len} bytes does not decode: {e}")
    })?;
    if msg.kind() != kind {
        return Err(format!(
            "rank {from}: the header says kind {kind} but the payload is a {}",
            msg.name()
        ));
    }
    Ok(msg)
}

/// A way to reach the other ranks.
pub trait Comm {
    /// This rank.
    fn rank(&self) -> usize;
    /// Sends without waiting for the receiver; returns the bytes that crossed to another rank.
    fn send(&mut self, to: usize, msg: Msg) -> Result<u64, String>;
    /// The next message that has arrived, if any.
    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, String>;
    /// Advances sends in flight; true when none is left.
    fn flush(&mut self) -> bool;
}

/// One process playing every role: messages are moved, never copied or serialised.
#[derive(Debug, Default)]
pub struct LocalComm {
    queue: VecDeque<Msg>,
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        0
    }

    fn send(&mut self, to: usize, msg: Msg) -> Result<u64, String> {
        if to != 0 {
            return Err(format!("no rank {to} in a single process"));
        }
        self.queue.push_back(msg);
        Ok(0)
    }

    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, String> {
        Ok(self.queue.pop_front().map(|m| (0, m)))
    }

    fn flush(&mut self) -> bool {
        true
    }
}

/// Ranks of an MPI job. Messages to this rank itself take the local queue.
pub struct MpiComm {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    local: VecDeque<Msg>,
    in_flight: Vec<InFlight>,
}

/// A send in flight and the buffer it reads.
struct InFlight {
    request: mpi::request::Request<'static, [u8], mpi::request::StaticScope>,
    buffer: *mut [u8],
}

const TAG: mpi::Tag = 77;

impl MpiComm {
    /// Wraps the world communicator.
    pub fn new(world: mpi::topology::SimpleCommunicator) -> MpiComm {
        use mpi::topology::Communicator;
        let rank = world.rank() as usize;
        MpiComm {
            world,
            rank,
            local: VecDeque::new(),
            in_flight: Vec::new(),
        }
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn send(&mut self, to: usize, msg: Msg) -> Result<u64, String> {
        use mpi::point_to_point::Destination;
        use mpi::topology::Communicator;
        if to == self.rank {
            self.local.push_back(msg);
            return Ok(0);
        }
        let bytes = encode(&msg)?;
        let n = bytes.len() as u64;
        let buffer: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        let ptr: *mut [u8] = buffer;
        // A non-blocking send, so that two ranks sending large messages to each other cannot
        // deadlock; the buffer is leaked here and reclaimed in `flush` once MPI is done with it.
        let request = self
            .world
            .process_at_rank(to as mpi::Rank)
            // SAFETY of the 'static borrow: the buffer is freed only after the request
            // completes (see `flush`), so it outlives every MPI read of it.
            .immediate_send_with_tag(mpi::request::StaticScope, &*buffer, TAG);
        self.in_flight.push(InFlight {
            request,
            buffer: ptr,
        });
        Ok(n)
    }

    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, String> {
        use mpi::datatype::Equivalence;
        use mpi::point_to_point::{MatchedReceiveVec, Source};
        use mpi::topology::Communicator;
        if let Some(m) = self.local.pop_front() {
            return Ok(Some((self.rank, m)));
        }
        let Some((message, status)) = self
            .world
            .any_process()
            .immediate_matched_probe_with_tag(TAG)
        else {
            return Ok(None);
        };
        let from = status.source_rank() as usize;
        let expected = status.count(u8::equivalent_datatype()) as usize;
        let (bytes, _) = (message, status).matched_receive_vec::<u8>();
        if bytes.len() != expected {
            return Err(format!(
                "rank {from}: probed {expected} bytes but received {}",
                bytes.len()
            ));
        }
        decode(&bytes, from).map(|m| Some((from, m)))
    }

    fn flush(&mut self) -> bool {
        let mut still = Vec::with_capacity(self.in_flight.len());
        for f in self.in_flight.drain(..) {
            match f.request.test() {
                Ok(_) => {
                    // SAFETY: `buffer` came from Box::leak in `send` and the request that read
                    // it has completed, so nothing else refers to it.
                    drop(unsafe { Box::from_raw(f.buffer) });
                }
                Err(request) => still.push(InFlight {
                    request,
                    buffer: f.buffer,
                }),
            }
        }
        self.in_flight = still;
        self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_mismatches_are_named() {
        let bytes = encode(&Msg::FrameFailed(3, "bad file".into())).unwrap();
        match decode(&bytes, 2).unwrap() {
            Msg::FrameFailed(3, e) => assert_eq!(e, "bad file"),
            m => panic!("decoded {}", m.name()),
        }
        let short = &bytes[..bytes.len() - 1];
        let err = decode(short, 2).unwrap_err();
        assert!(err.contains("rank 2") && err.contains("header"), "{err}");
        let mut wrong_kind = bytes.clone();
        wrong_kind[4] = 9;
        let err = decode(&wrong_kind, 5).unwrap_err();
        assert!(err.contains("kind 9"), "{err}");
        assert!(decode(&[0u8; 20], 1).unwrap_err().contains("header"));
    }
}
