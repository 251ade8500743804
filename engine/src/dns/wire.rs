//! The DNS message format (RFC 1035 §4, EDNS(0) of RFC 6891) as far as the proxy needs it:
//! a whole message parsed from bytes and written back, with A, AAAA and CNAME data decoded and
//! every other record type kept as opaque bytes. No I/O.
//!
//! Parsing is bounded by the input: counts are believed only as far as the bytes go, a
//! compression pointer must point backwards (so a loop is impossible), a name is at most 255
//! bytes on the wire and a label 63. Any violation is a [`WireError`], never a panic (the
//! `dns_message` fuzz target and the property tests hold it to that).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The fixed header's length.
pub const HEADER_LEN: usize = 12;
/// The largest UDP payload a client without EDNS accepts (RFC 1035 §4.2.1).
pub const CLASSIC_UDP: usize = 512;
/// The largest message at all (TCP's two-byte length prefix).
pub const MAX_MESSAGE: usize = 65_535;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Record type OPT (EDNS).
pub const TYPE_OPT: u16 = 41;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response codes the proxy sends itself.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// The query could not be interpreted.
    pub const FORMERR: u8 = 1;
    /// The server failed (no upstream answered, unknown client).
    pub const SERVFAIL: u8 = 2;
    /// The name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// The opcode is not supported.
    pub const NOTIMP: u8 = 4;
}

/// Why bytes are not a DNS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes: not even an id to answer to.
    #[error("shorter than a DNS header")]
    Short,
    /// The message ends inside a question or record.
    #[error("the message ends inside a section")]
    Truncated,
    /// A name with a label over 63 bytes, over 255 bytes in all, a pointer that does not go
    /// backwards, or a reserved label type.
    #[error("malformed name")]
    BadName,
    /// Record data whose length does not fit its type (an A record of 5 bytes, say).
    #[error("malformed record data")]
    BadRecord,
    /// Bytes left after the last record the header announced.
    #[error("trailing bytes after the last record")]
    Trailing,
    /// Too large to write (a section of more than 65 535 entries, or over [`MAX_MESSAGE`]).
    #[error("message too large")]
    TooLarge,
}

/// A domain name: its labels as they came (case kept), without the root label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Name {
    labels: Vec<Vec<u8>>,
}

impl Name {
    /// The root name.
    pub fn root() -> Name {
        Name::default()
    }

    /// A name from labels; `None` if a label is empty or over 63 bytes, or the whole name
    /// would be over 255 bytes on the wire.
    pub fn from_labels<I, L>(labels: I) -> Option<Name>
    where
        I: IntoIterator<Item = L>,
        L: AsRef<[u8]>,
    {
        let labels: Vec<Vec<u8>> = labels.into_iter().map(|l| l.as_ref().to_vec()).collect();
        let name = Name { labels };
        name.is_valid().then_some(name)
    }

    /// A name from dotted text (`a.b.c` or `a.b.c.`); `None` where [`Name::from_labels`] says so.
    pub fn parse(text: &str) -> Option<Name> {
        let t = text.strip_suffix('.').unwrap_or(text);
        if t.is_empty() {
            return Some(Name::root());
        }
        Name::from_labels(t.split('.'))
    }

    fn is_valid(&self) -> bool {
        self.labels.iter().all(|l| !l.is_empty() && l.len() <= 63) && self.wire_len() <= 255
    }

    /// The labels, first (leftmost) first.
    pub fn labels(&self) -> &[Vec<u8>] {
        &self.labels
    }

    /// Number of labels (the root not counted).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True for the root name.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes on the wire without compression.
    pub fn wire_len(&self) -> usize {
        self.labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1
    }

    /// Lowercase dotted text without the trailing dot (what hostnames in the config look
    /// like); `None` if a label is not printable ASCII or holds a dot.
    pub fn to_lookup(&self) -> Option<String> {
        let mut out = String::with_capacity(self.wire_len());
        for (i, l) in self.labels.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for &b in l {
                if !b.is_ascii_graphic() || b == b'.' {
                    return None;
                }
                out.push(b.to_ascii_lowercase() as char);
            }
        }
        Some(out)
    }
}

impl fmt::Display for Name {
    /// Dotted, with the trailing dot, bytes outside printable ASCII escaped as `\DDD`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.labels.is_empty() {
            return f.write_str(".");
        }
        for l in &self.labels {
            for &b in l {
                if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                    write!(f, "{}", b as char)?;
                } else {
                    write!(f, "\\{b:03}")?;
                }
            }
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// One question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// QNAME.
    pub name: Name,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
}

/// Record data: decoded where the proxy writes or reads that type, bytes otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// The canonical name.
    Cname(Name),
    /// Any other type, its RDATA as it came (type OPT included: see [`Message::opt`]).
    Other(Vec<u8>),
}

/// One resource record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Owner name.
    pub name: Name,
    /// TYPE (must agree with `data` for A, AAAA and CNAME).
    pub rtype: u16,
    /// CLASS (for OPT: the sender's UDP payload size).
    pub class: u16,
    /// TTL (for OPT: extended rcode, version and flags).
    pub ttl: u32,
    /// RDATA.
    pub data: RData,
}

impl Record {
    /// An IN record with the type `data` implies.
    pub fn new(name: Name, ttl: u32, data: RData) -> Record {
        let rtype = match data {
            RData::A(_) => TYPE_A,
            RData::Aaaa(_) => TYPE_AAAA,
            RData::Cname(_) => TYPE_CNAME,
            RData::Other(_) => 0,
        };
        Record {
            name,
            rtype,
            class: CLASS_IN,
            ttl,
            data,
        }
    }
}

/// EDNS(0) as the OPT pseudo-record carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    /// The sender's largest UDP payload.
    pub udp_size: u16,
    /// EDNS version.
    pub version: u8,
    /// The DO bit (DNSSEC answers wanted).
    pub dnssec_ok: bool,
}

/// A whole message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// ID.
    pub id: u16,
    /// The second header word: QR, opcode, AA, TC, RD, RA, Z, AD, CD, RCODE.
    pub flags: u16,
    /// Question section.
    pub questions: Vec<Question>,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section.
    pub authority: Vec<Record>,
    /// Additional section (an OPT record included).
    pub additional: Vec<Record>,
}

/// QR: this is a response.
pub const FLAG_QR: u16 = 0x8000;
/// AA: authoritative answer.
pub const FLAG_AA: u16 = 0x0400;
/// TC: truncated.
pub const FLAG_TC: u16 = 0x0200;
/// RD: recursion desired.
pub const FLAG_RD: u16 = 0x0100;
/// RA: recursion available.
pub const FLAG_RA: u16 = 0x0080;
/// CD: checking disabled.
pub const FLAG_CD: u16 = 0x0010;

impl Message {
    /// The opcode (0: standard query).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    /// True for a response.
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    /// True when the TC bit is set.
    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TC != 0
    }

    /// The RCODE of the header (its low 4 bits).
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }

    /// The EDNS options of the first OPT record of the additional section.
    pub fn opt(&self) -> Option<Edns> {
        let r = self.additional.iter().find(|r| r.rtype == TYPE_OPT)?;
        Some(Edns {
            udp_size: r.class,
            version: (r.ttl >> 16) as u8,
            dnssec_ok: r.ttl & 0x8000 != 0,
        })
    }

    /// Parses a whole message; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::Short);
        }
        let word = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
        let counts = [word(4), word(6), word(8), word(10)];
        let mut r = Reader {
            bytes,
            at: HEADER_LEN,
        };
        let mut msg = Message {
            id: word(0),
            flags: word(2),
            ..Message::default()
        };
        // Each entry takes at least 5 bytes: a count larger than what is left is a lie the
        // reader finds at once, and capacities are capped so it cannot ask for memory.
        let cap = |n: u16| usize::from(n).min(bytes.len() / 5);
        msg.questions.reserve(cap(counts[0]));
        for _ in 0..counts[0] {
            let name = r.name()?;
            let qtype = r.u16()?;
            let qclass = r.u16()?;
            msg.questions.push(Question {
                name,
                qtype,
                qclass,
            });
        }
        for (section, &n) in [&mut msg.answers, &mut msg.authority, &mut msg.additional]
            .into_iter()
            .zip(&counts[1..])
        {
            section.reserve(cap(n));
            for _ in 0..n {
                section.push(r.record()?);
            }
        }
        if r.at != bytes.len() {
            return Err(WireError::Trailing);
        }
        Ok(msg)
    }

    /// Writes the message without name compression.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let count = |n: usize| u16::try_from(n).map_err(|_| WireError::TooLarge);
        let mut out = Vec::with_capacity(CLASSIC_UDP);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for n in [
            self.questions.len(),
            self.answers.len(),
            self.authority.len(),
            self.additional.len(),
        ] {
            out.extend_from_slice(&count(n)?.to_be_bytes());
        }
        for q in &self.questions {
            put_name(&mut out, &q.name);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for r in self
            .answers
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            put_record(&mut out, r)?;
        }
        if out.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge);
        }
        Ok(out)
    }
}

/// The id of whatever starts with a DNS header, to answer even a message that does not parse.
pub fn header_id(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
        .filter(|_| bytes.len() >= HEADER_LEN)
}

fn put_name(out: &mut Vec<u8>, name: &Name) {
    for l in name.labels() {
        // Labels are at most 63 bytes: every way to build a Name checks it.
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

fn put_record(out: &mut Vec<u8>, r: &Record) -> Result<(), WireError> {
    put_name(out, &r.name);
    out.extend_from_slice(&r.rtype.to_be_bytes());
    out.extend_from_slice(&r.class.to_be_bytes());
    out.extend_from_slice(&r.ttl.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    match &r.data {
        RData::A(ip) => out.extend_from_slice(&ip.octets()),
        RData::Aaaa(ip) => out.extend_from_slice(&ip.octets()),
        RData::Cname(n) => put_name(out, n),
        RData::Other(b) => out.extend_from_slice(b),
    }
    let len = u16::try_from(out.len() - at - 2).map_err(|_| WireError::TooLarge)?;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A cursor over a message.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A name at the cursor, following compression pointers (each strictly backwards).
    fn name(&mut self) -> Result<Name, WireError> {
        let (name, end) = read_name(self.bytes, self.at)?;
        self.at = end;
        Ok(name)
    }

    fn record(&mut self) -> Result<Record, WireError> {
        let name = self.name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl = self.u32()?;
        let len = usize::from(self.u16()?);
        let start = self.at;
        let raw = self.take(len)?;
        let data = match (rtype, class) {
            (TYPE_A, CLASS_IN) => {
                let o: [u8; 4] = raw.try_into().map_err(|_| WireError::BadRecord)?;
                RData::A(Ipv4Addr::from(o))
            }
            (TYPE_AAAA, CLASS_IN) => {
                let o: [u8; 16] = raw.try_into().map_err(|_| WireError::BadRecord)?;
                RData::Aaaa(Ipv6Addr::from(o))
            }
            (TYPE_CNAME, CLASS_IN) => {
                // The name may point back into the message, so it is read from the whole
                // buffer; it must end exactly where the record data does.
                let (n, end) = read_name(self.bytes, start)?;
                if end != start + len {
                    return Err(WireError::BadRecord);
                }
                RData::Cname(n)
            }
            _ => RData::Other(raw.to_vec()),
        };
        Ok(Record {
            name,
            rtype,
            class,
            ttl,
            data,
        })
    }
}

/// Reads the name at `at`; returns it and where the bytes after it (not after any pointer's
/// target) begin.
fn read_name(bytes: &[u8], mut at: usize) -> Result<(Name, usize), WireError> {
    let mut labels = Vec::new();
    let mut wire = 1usize;
    let mut end = None;
    // Where the last jump went: the next pointer must point before it, so jumps strictly
    // descend and a loop cannot happen.
    let mut floor = at;
    loop {
        let len = *bytes.get(at).ok_or(WireError::Truncated)?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    let after = at + 1;
                    return Ok((Name { labels }, end.unwrap_or(after)));
                }
                let l = usize::from(len);
                let label = bytes.get(at + 1..at + 1 + l).ok_or(WireError::Truncated)?;
                wire += l + 1;
                if wire > 255 {
                    return Err(WireError::BadName);
                }
                labels.push(label.to_vec());
                at += 1 + l;
            }
            0xc0 => {
                let lo = *bytes.get(at + 1).ok_or(WireError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, lo]));
                if target >= floor {
                    return Err(WireError::BadName);
                }
                end.get_or_insert(at + 2);
                floor = target;
                at = target;
            }
            _ => return Err(WireError::BadName),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    /// `dig example.com A` as dig 9.18 sends it (with a cookie option).
    const DIG_QUERY: &[u8] = &[
        0x4a, 0x1f, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1, 7, b'e', b'x', b'a', b'm', b'p', b'l',
        b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1, 0, 0, 0x29, 0x04, 0xd0, 0, 0, 0, 0, 0, 0x0c, 0,
        0x0a, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn a_real_query_parses() {
        let m = Message::decode(DIG_QUERY).unwrap();
        assert_eq!(m.id, 0x4a1f);
        assert_eq!(m.opcode(), 0);
        assert!(!m.is_response());
        assert_eq!(m.questions.len(), 1);
        assert_eq!(m.questions[0].name.to_string(), "example.com.");
        assert_eq!(m.questions[0].qtype, TYPE_A);
        let e = m.opt().unwrap();
        assert_eq!((e.udp_size, e.version, e.dnssec_ok), (1232, 0, false));
        assert_eq!(m.encode().unwrap(), DIG_QUERY);
    }

    #[test]
    fn compressed_names_are_followed_backwards_only() {
        // Header, question `a.b.`, answer named by a pointer to offset 12, CNAME → pointer.
        let mut b = vec![0, 7, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        b.extend_from_slice(&[1, b'a', 1, b'b', 0, 0, 5, 0, 1]);
        b.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 0xc0, 14]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(m.answers[0].name, n("a.b"));
        assert_eq!(m.answers[0].data, RData::Cname(n("b")));
        // A pointer to itself, or forwards, is refused.
        let mut looped = b.clone();
        let last = looped.len() - 1;
        looped[last] = (last - 1) as u8;
        assert_eq!(Message::decode(&looped), Err(WireError::BadName));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(Message::decode(&[1, 2, 3]), Err(WireError::Short));
        assert_eq!(header_id(&[1, 2, 3]), None);
        let mut b = DIG_QUERY.to_vec();
        b.push(0);
        assert_eq!(Message::decode(&b), Err(WireError::Trailing));
        assert_eq!(Message::decode(&DIG_QUERY[..20]), Err(WireError::Truncated));
        // 65 535 questions announced in a 12-byte message: refused without a large allocation.
        let b = [0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        assert_eq!(Message::decode(&b), Err(WireError::Truncated));
        // A 64-byte label is a reserved label type (0x40).
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        b.extend_from_slice(&[b'x'; 64]);
        assert_eq!(Message::decode(&b), Err(WireError::BadName));
    }

    #[test]
    fn names_are_bounded_and_looked_up_in_lowercase() {
        assert!(Name::parse(&"a".repeat(64)).is_none());
        assert!(Name::parse(&["x"; 128].join(".")).is_none());
        assert!(Name::parse(&["x"; 127].join(".")).is_some());
        assert_eq!(n("Echo.NS.svc.").to_lookup().unwrap(), "echo.ns.svc");
        assert!(Name::from_labels([b"a.b".as_slice()])
            .unwrap()
            .to_lookup()
            .is_none());
        assert_eq!(
            Name::from_labels([b"a\x01".as_slice()])
                .unwrap()
                .to_string(),
            "a\\001."
        );
        assert_eq!(Name::root().to_string(), ".");
    }

    fn name() -> impl Strategy<Value = Name> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..20), 0..6)
            .prop_map(|l| Name::from_labels(l).unwrap())
    }

    fn record() -> impl Strategy<Value = Record> {
        let data = prop_oneof![
            any::<[u8; 4]>().prop_map(|o| RData::A(o.into())),
            any::<[u8; 16]>().prop_map(|o| RData::Aaaa(o.into())),
            name().prop_map(RData::Cname),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(RData::Other),
        ];
        (name(), data, any::<u32>(), 100u16..200).prop_map(|(name, data, ttl, other)| {
            let mut r = Record::new(name, ttl, data);
            if r.rtype == 0 {
                r.rtype = other;
            }
            r
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        let q = (name(), any::<u16>(), any::<u16>()).prop_map(|(name, qtype, qclass)| Question {
            name,
            qtype,
            qclass,
        });
        (
            any::<u16>(),
            any::<u16>(),
            prop::collection::vec(q, 0..3),
            prop::collection::vec(record(), 0..4),
            prop::collection::vec(record(), 0..2),
            prop::collection::vec(record(), 0..3),
        )
            .prop_map(
                |(id, flags, questions, answers, authority, additional)| Message {
                    id,
                    flags,
                    questions,
                    answers,
                    authority,
                    additional,
                },
            )
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(m in message()) {
            let bytes = m.encode().unwrap();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = Message::decode(&b) {
                // Whatever parses writes back out and parses to the same message.
                let again = m.encode().unwrap();
                prop_assert_eq!(Message::decode(&again).unwrap(), m);
            }
        }

        #[test]
        fn mangled_queries_never_panic(at in 0usize..DIG_QUERY.len(), v in any::<u8>(), cut in 0usize..DIG_QUERY.len()) {
            let mut b = DIG_QUERY.to_vec();
            b[at] = v;
            let _ = Message::decode(&b);
            let _ = Message::decode(&b[..cut]);
        }
    }
}
