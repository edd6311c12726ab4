//! Messages between roles, and the two ways they travel: a queue inside one process, or MPI
//! between ranks (host-staged: every message is serialised into host memory).
//!
//! The cuda-aware-mpi build adds messages with *parts*: arrays of f64 that travel as MPI
//! messages of their own (tag `TAG_PART`) right after their header, straight from or into
//! device memory where they live there (a GPU compute rank's unit pixels and results). The
//! header states each part's length, and the receiver checks what arrived against it.
//!
//! On the wire a message is one MPI message of bytes: a 16-byte header (magic, kind, payload
//! length) and the bincode payload. The receiver checks the byte count it received against the
//! header, and the payload against the kind, and reports a mismatch as an error naming the
//! sender instead of decoding garbage ([`CommError`]).
//!
//! Imports the pipeline's `unit` and `report` (what messages carry) and, in the cuda-aware-mpi
//! build, `extract::gpu::unit` (the shape of a unit's results).

// Counts cross into C here (cfitsio's and MPI's `int`): converted with `try_from`, never `as`.
#![deny(clippy::cast_possible_truncation)]

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
    /// Compute → reader: a first-pass unit's share of its frame's model (`--ivar-from-model`).
    ModelPart(Box<super::unit::ModelPart>),
    /// Compute → writers of its node: it will send no more outputs.
    ComputeDone,
    /// Reader → writers of its node: it will send no more tickets.
    ReaderDone,
    /// Every rank → rank 0, at the end.
    Summary(Box<RankSummary>),
    /// Writer → rank 0: how a frame is getting on, for the run's progress display.
    Progress(usize, super::progress::FrameNote),
    /// Compute → reader: give me a unit, its pixels as parts for device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    ReqWorkParts,
    /// Reader → compute: a unit without its pixels, the writer, and the pixels as two parts
    /// (image, ivar; row-major, `dims` rows × columns).
    #[cfg(feature = "cuda-aware-mpi")]
    WorkParts(Box<UnitInput>, usize, [usize; 2], Parts),
    /// Compute → writer: a computed unit whose numbers travel as five parts (flux, ivar,
    /// resolution, chi2pix, pixmask, as `UnitShape::part_lens` orders them).
    #[cfg(feature = "cuda-aware-mpi")]
    OutputParts(Box<UnitOutput>, crate::extract::gpu::unit::UnitShape, Parts),
}

/// The arrays that travel after a header: their lengths (in the header) and, at either end,
/// where they are.
#[cfg(feature = "cuda-aware-mpi")]
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Parts {
    /// Values of each part.
    pub lens: Vec<usize>,
    /// The arrays: what the sender sends, what the receiver received.
    #[serde(skip)]
    pub data: Vec<Part>,
}

/// One part's array.
#[cfg(feature = "cuda-aware-mpi")]
pub enum Part {
    /// In host memory.
    Host(Vec<f64>),
    /// In device memory; MPI reads or writes it there (CUDA-aware MPI).
    Device(cudarc::driver::CudaSlice<f64>),
}

#[cfg(feature = "cuda-aware-mpi")]
impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Host(v) => write!(f, "Host({} values)", v.len()),
            Part::Device(d) => write!(f, "Device({} values)", d.len()),
        }
    }
}

#[cfg(feature = "cuda-aware-mpi")]
impl Part {
    /// Values it holds.
    pub fn len(&self) -> usize {
        match self {
            Part::Host(v) => v.len(),
            Part::Device(d) => d.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(feature = "cuda-aware-mpi")]
impl Parts {
    /// Parts with their lengths, to send.
    pub fn of(data: Vec<Part>) -> Parts {
        Parts {
            lens: data.iter().map(Part::len).collect(),
            data,
        }
    }
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
            Msg::Progress(..) => 15,
            Msg::ModelPart(_) => 16,
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::ReqWorkParts => 12,
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::WorkParts(..) => 13,
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::OutputParts(..) => 14,
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
            Msg::Progress(..) => "frame progress",
            Msg::ModelPart(_) => "model share",
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::ReqWorkParts => "work request (device)",
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::WorkParts(..) => "work unit (parts)",
            #[cfg(feature = "cuda-aware-mpi")]
            Msg::OutputParts(..) => "unit output (parts)",
        }
    }

    /// The parts that travel after this message, when it has any.
    #[cfg(feature = "cuda-aware-mpi")]
    pub fn parts_mut(&mut self) -> Option<&mut Parts> {
        match self {
            Msg::WorkParts(.., p) | Msg::OutputParts(.., p) => Some(p),
            _ => None,
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

/// Why a message could not travel, naming the rank it came from or went to.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A message did not serialise.
    #[error("encoding a {kind}: {why}")]
    Encode {
        /// The message's name.
        kind: &'static str,
        /// bincode's complaint.
        why: String,
    },
    /// Fewer bytes than a header.
    #[error("rank {from} sent a {len}-byte message, shorter than the {HEADER}-byte header")]
    Short {
        /// The sender.
        from: usize,
        /// Bytes received.
        len: usize,
    },
    /// Not one of spextract's messages.
    #[error("rank {from} sent a message without spextract's header")]
    NoHeader {
        /// The sender.
        from: usize,
    },
    /// The payload is not as long as the header says.
    #[error(
        "rank {from}: received {got} payload bytes but the header of this kind-{kind} message \
         says {len}"
    )]
    Length {
        /// The sender.
        from: usize,
        /// Payload bytes received.
        got: usize,
        /// The header's kind.
        kind: u32,
        /// The header's payload length.
        len: usize,
    },
    /// The payload does not decode.
    #[error("rank {from}: a kind-{kind} message of {len} bytes does not decode: {why}")]
    Decode {
        /// The sender.
        from: usize,
        /// The header's kind.
        kind: u32,
        /// Payload bytes.
        len: usize,
        /// bincode's complaint.
        why: String,
    },
    /// The payload is another kind of message than the header says.
    #[error("rank {from}: the header says kind {kind} but the payload is a {name}")]
    Kind {
        /// The sender.
        from: usize,
        /// The header's kind.
        kind: u32,
        /// What the payload is.
        name: &'static str,
    },
    /// A rank beyond what MPI can name.
    #[error("no rank {to} in this MPI job")]
    NotInJob {
        /// The rank asked for.
        to: usize,
    },
    /// A single process has only rank 0.
    #[error("no rank {to} in a single process")]
    NoSuchRank {
        /// The rank asked for.
        to: usize,
    },
    /// MPI delivered another byte count than its probe announced.
    #[error("rank {from}: probed {expected} bytes but received {got}")]
    Probe {
        /// The sender.
        from: usize,
        /// Bytes the probe announced.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A part too large for one MPI message.
    #[cfg(feature = "cuda-aware-mpi")]
    #[error("a part of {bytes} bytes is over MPI's count limit")]
    PartTooLarge {
        /// Its bytes.
        bytes: usize,
    },
    /// A part is not as long as its header says.
    #[cfg(feature = "cuda-aware-mpi")]
    #[error(
        "rank {from} sent {got} bytes for part {part} of a {kind}, whose header says {len} \
         values ({want} bytes)"
    )]
    PartLength {
        /// The sender.
        from: usize,
        /// Bytes received.
        got: usize,
        /// Which part.
        part: usize,
        /// The message's name.
        kind: &'static str,
        /// Values the header announced.
        len: usize,
        /// Bytes that makes.
        want: usize,
    },
    /// The GPU refused a step of moving a part.
    #[cfg(feature = "cuda-aware-mpi")]
    #[error("{doing}: {why}")]
    Gpu {
        /// The step.
        doing: String,
        /// The driver's error.
        why: String,
    },
}

const MAGIC: u32 = 0x5350_5854; // "SPXT"
const HEADER: usize = 16;

/// Serialises `msg` with its header.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, CommError> {
    let payload = bincode::serialize(msg).map_err(|e| CommError::Encode {
        kind: msg.name(),
        why: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&msg.kind().to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header of `bytes` (from rank `from`) against what arrived, then decodes.
pub fn decode(bytes: &[u8], from: usize) -> Result<Msg, CommError> {
    if bytes.len() < HEADER {
        return Err(CommError::Short {
            from,
            len: bytes.len(),
        });
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC {
        return Err(CommError::NoHeader { from });
    }
    let kind = word(4);
    // A length beyond usize cannot match what arrived: it fails the check below.
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if bytes.len() - HEADER != len {
        return Err(CommError::Length {
            from,
            got: bytes.len() - HEADER,
            kind,
            len,
        });
    }
    let msg: Msg = bincode::deserialize(&bytes[HEADER..]).map_err(|e| CommError::Decode {
        from,
        kind,
        len,
        why: e.to_string(),
    })?;
    if msg.kind() != kind {
        return Err(CommError::Kind {
            from,
            kind,
            name: msg.name(),
        });
    }
    Ok(msg)
}

/// `r` as MPI's rank type (ranks come from the world's size, an `int`).
fn mpi_rank(r: usize) -> Result<mpi::Rank, CommError> {
    mpi::Rank::try_from(r).map_err(|_| CommError::NotInJob { to: r })
}

/// A way to reach the other ranks.
pub trait Comm {
    /// This rank.
    fn rank(&self) -> usize;
    /// Sends without waiting for the receiver; returns the bytes that crossed to another rank.
    fn send(&mut self, to: usize, msg: Msg) -> Result<u64, CommError>;
    /// The next message that has arrived, if any.
    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, CommError>;
    /// Advances sends in flight; true when none is left.
    fn flush(&mut self) -> bool;
    /// Seconds spent receiving each kind of message from other ranks, and how many.
    fn receive_times(&self) -> Vec<(String, f64, usize)> {
        Vec::new()
    }
    /// Whether units' pixels can be received into device memory allocated on `stream` (then
    /// from now on they are).
    #[cfg(feature = "cuda-aware-mpi")]
    fn receive_pixels_on(&mut self, _stream: std::sync::Arc<cudarc::driver::CudaStream>) -> bool {
        false
    }
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

    fn send(&mut self, to: usize, msg: Msg) -> Result<u64, CommError> {
        if to != 0 {
            return Err(CommError::NoSuchRank { to });
        }
        self.queue.push_back(msg);
        Ok(0)
    }

    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, CommError> {
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
    /// Sends of parts in flight.
    #[cfg(feature = "cuda-aware-mpi")]
    parts_in_flight: Vec<PartSend>,
    /// Where the parts of a unit's pixels land: device memory allocated on this stream.
    #[cfg(feature = "cuda-aware-mpi")]
    device: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    /// Seconds spent receiving each kind of message, header and parts, and how many.
    received: std::collections::BTreeMap<&'static str, (f64, usize)>,
}

/// A send in flight and the buffer it reads.
struct InFlight {
    request: mpi::request::Request<'static, [u8], mpi::request::StaticScope>,
    buffer: *mut [u8],
}

/// A part's send in flight: the request, MPI's description of the part's memory (leaked,
/// reclaimed with the request) and the part itself, freed once MPI is done with it.
#[cfg(feature = "cuda-aware-mpi")]
struct PartSend {
    request: mpi::request::Request<
        'static,
        mpi::datatype::DynBuffer<'static>,
        mpi::request::StaticScope,
    >,
    buffer: *mut mpi::datatype::DynBuffer<'static>,
    _part: Part,
}

const TAG: mpi::Tag = 77;
/// The tag of the parts that follow a header.
#[cfg(feature = "cuda-aware-mpi")]
pub const TAG_PART: mpi::Tag = 78;

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
            #[cfg(feature = "cuda-aware-mpi")]
            parts_in_flight: Vec::new(),
            #[cfg(feature = "cuda-aware-mpi")]
            device: None,
            received: Default::default(),
        }
    }

    /// Posts a send of `buffer` to `to` with `tag`; the buffer is leaked here and reclaimed in
    /// `flush` once MPI is done with it.
    fn post(&mut self, to: usize, tag: mpi::Tag, buffer: Box<[u8]>) -> Result<(), CommError> {
        use mpi::point_to_point::Destination;
        use mpi::topology::Communicator;
        let rank = mpi_rank(to)?;
        let buffer: &'static mut [u8] = Box::leak(buffer);
        let ptr: *mut [u8] = buffer;
        // A non-blocking send, so that two ranks sending large messages to each other cannot
        // deadlock; the buffer is leaked here and reclaimed in `flush` once MPI is done with it.
        let request = self
            .world
            .process_at_rank(rank)
            // SAFETY of the 'static borrow: the buffer is freed only after the request
            // completes (see `flush`), so it outlives every MPI read of it.
            .immediate_send_with_tag(mpi::request::StaticScope, &*buffer, tag);
        self.in_flight.push(InFlight {
            request,
            buffer: ptr,
        });
        Ok(())
    }

    /// Sends the parts of a message after its header.
    #[cfg(feature = "cuda-aware-mpi")]
    fn send_parts(&mut self, to: usize, parts: Vec<Part>) -> Result<u64, CommError> {
        use mpi::point_to_point::Destination;
        use mpi::topology::Communicator;
        let mut n = 0u64;
        for part in parts {
            let bytes = part.len() * std::mem::size_of::<f64>();
            if i32::try_from(bytes).is_err() {
                return Err(CommError::PartTooLarge { bytes });
            }
            n += bytes as u64;
            if let Part::Device(d) = &part {
                // Open MPI finds the device memory's context as the thread's current one.
                d.stream()
                    .context()
                    .bind_to_thread()
                    .map_err(|e| CommError::Gpu {
                        doing: "binding the GPU's context to send a part".into(),
                        why: format!("{e:?}"),
                    })?;
            }
            let buffer: &'static mut mpi::datatype::DynBuffer<'static> =
                Box::leak(Box::new(part_buffer(&part)?.downgrade()));
            let ptr: *mut mpi::datatype::DynBuffer<'static> = buffer;
            let request = self
                .world
                .process_at_rank(mpi_rank(to)?)
                // SAFETY of the 'static borrow: the description is freed, and the memory it
                // describes (the part's) dropped, only once the request has completed (see
                // `flush`).
                .immediate_send_with_tag(mpi::request::StaticScope, &*buffer, TAG_PART);
            self.parts_in_flight.push(PartSend {
                request,
                buffer: ptr,
                _part: part,
            });
        }
        Ok(n)
    }

    /// Receives the parts that `parts.lens` announces from `from`: into device memory for a
    /// unit's pixels on a rank that asked for them there, else into host memory.
    #[cfg(feature = "cuda-aware-mpi")]
    fn receive_parts(
        &mut self,
        from: usize,
        kind: &'static str,
        parts: &mut Parts,
        on_device: bool,
    ) -> Result<(), CommError> {
        use mpi::datatype::Equivalence;
        use mpi::point_to_point::Source;
        use mpi::topology::Communicator;
        for (i, &len) in parts.lens.iter().enumerate() {
            let (message, status) = self
                .world
                .process_at_rank(mpi_rank(from)?)
                .matched_probe_with_tag(TAG_PART);
            let got = status.count(u8::equivalent_datatype()) as usize;
            let want = len * std::mem::size_of::<f64>();
            if got != want {
                return Err(CommError::PartLength {
                    from,
                    got,
                    part: i,
                    kind,
                    len,
                    want,
                });
            }
            let part = match (&self.device, on_device) {
                (Some(stream), true) => {
                    let d = stream
                        .alloc_zeros::<f64>(len.max(1))
                        .map_err(|e| CommError::Gpu {
                            doing: format!("allocating {want} bytes on the GPU for a {kind}"),
                            why: format!("{e:?}"),
                        })?;
                    // MPI writes outside the stream: the allocation must be done first.
                    stream.synchronize().map_err(|e| CommError::Gpu {
                        doing: format!("allocating on the GPU for a {kind}"),
                        why: format!("{e:?}"),
                    })?;
                    let mut part = Part::Device(d);
                    let mut raw = part_buffer(&part)?;
                    message.matched_receive_into(&mut raw);
                    if let Part::Device(d) = &mut part {
                        // cudarc records the write for its ordering of later users of `d`.
                        drop(cudarc::driver::DevicePtrMut::device_ptr_mut(d, stream).1);
                    }
                    part
                }
                _ => {
                    let mut v = vec![0f64; len];
                    message.matched_receive_into(&mut v[..]);
                    Part::Host(v)
                }
            };
            parts.data.push(part);
        }
        Ok(())
    }
}

/// A part's memory (host, or device) as an MPI buffer of f64 values, which MPI reads or
/// writes where it is. The caller keeps the part alive until MPI is done with the buffer.
#[cfg(feature = "cuda-aware-mpi")]
fn part_buffer(part: &Part) -> Result<mpi::datatype::DynBufferMut<'static>, CommError> {
    use cudarc::driver::DevicePtr;
    use mpi::datatype::Equivalence;
    let count = mpi::Count::try_from(part.len()).map_err(|_| CommError::PartTooLarge {
        bytes: part.len() * std::mem::size_of::<f64>(),
    })?;
    let ptr = match part {
        Part::Host(v) => v.as_ptr().cast_mut(),
        Part::Device(d) => d.device_ptr(d.stream()).0 as *mut f64,
    };
    // SAFETY: `ptr` is the start of a live allocation of `count` f64 values (a Vec's heap
    // buffer, which does not move with the Vec, or a device allocation), described with the
    // f64 datatype, so MPI touches exactly that memory. Device memory goes only to a
    // CUDA-aware MPI: `execute` refuses any other in this build. The datatype is a predefined
    // one, valid for the whole program ('static).
    Ok(unsafe { mpi::datatype::DynBufferMut::from_raw(ptr, count, f64::equivalent_datatype()) })
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    #[allow(unused_mut)]
    fn send(&mut self, to: usize, mut msg: Msg) -> Result<u64, CommError> {
        if to == self.rank {
            self.local.push_back(msg);
            return Ok(0);
        }
        let bytes = encode(&msg)?;
        let n = bytes.len() as u64;
        self.post(to, TAG, bytes.into_boxed_slice())?;
        #[cfg(feature = "cuda-aware-mpi")]
        if let Some(parts) = msg.parts_mut() {
            let data = std::mem::take(&mut parts.data);
            return Ok(n + self.send_parts(to, data)?);
        }
        Ok(n)
    }

    fn try_recv(&mut self) -> Result<Option<(usize, Msg)>, CommError> {
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
        let t0 = std::time::Instant::now();
        let from = status.source_rank() as usize;
        let expected = status.count(u8::equivalent_datatype()) as usize;
        let (bytes, _) = (message, status).matched_receive_vec::<u8>();
        if bytes.len() != expected {
            return Err(CommError::Probe {
                from,
                expected,
                got: bytes.len(),
            });
        }
        #[allow(unused_mut)]
        let mut msg = decode(&bytes, from)?;
        let kind = msg.name();
        #[cfg(feature = "cuda-aware-mpi")]
        {
            let on_device = matches!(msg, Msg::WorkParts(..));
            if let Some(parts) = msg.parts_mut() {
                self.receive_parts(from, kind, parts, on_device)?;
            }
        }
        let e = self.received.entry(kind).or_default();
        e.0 += t0.elapsed().as_secs_f64();
        e.1 += 1;
        Ok(Some((from, msg)))
    }

    fn receive_times(&self) -> Vec<(String, f64, usize)> {
        self.received
            .iter()
            .map(|(k, &(s, n))| (k.to_string(), s, n))
            .collect()
    }

    #[cfg(feature = "cuda-aware-mpi")]
    fn receive_pixels_on(&mut self, stream: std::sync::Arc<cudarc::driver::CudaStream>) -> bool {
        self.device = Some(stream);
        true
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
        #[cfg(feature = "cuda-aware-mpi")]
        {
            let mut still = Vec::with_capacity(self.parts_in_flight.len());
            for f in self.parts_in_flight.drain(..) {
                match f.request.test() {
                    Ok(_) => {
                        // SAFETY: `buffer` came from Box::leak in `send_parts` and its request
                        // has completed; the part's memory drops with `f`.
                        drop(unsafe { Box::from_raw(f.buffer) });
                    }
                    Err(request) => still.push(PartSend { request, ..f }),
                }
            }
            self.parts_in_flight = still;
            if !self.parts_in_flight.is_empty() {
                return false;
            }
        }
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
        let err = decode(short, 2).unwrap_err().to_string();
        assert!(err.contains("rank 2") && err.contains("header"), "{err}");
        let mut wrong_kind = bytes.clone();
        wrong_kind[4] = 9;
        let err = decode(&wrong_kind, 5).unwrap_err().to_string();
        assert!(err.contains("kind 9"), "{err}");
        assert!(decode(&[0u8; 20], 1)
            .unwrap_err()
            .to_string()
            .contains("header"));
    }
}
