//! The ZDS messages (istio/ztunnel's `proto/zds.proto`, package `istio.workload.zds`) and a
//! small hand-written protobuf codec for them.
//!
//! The protocol has six messages of at most three string fields each, so a codec of a few dozen
//! lines replaces a protobuf toolchain. Decoding follows proto3 as prost and Go's encoder do:
//! fields may come in any order, unknown fields are skipped, a repeated scalar field keeps its last
//! value, a repeated message field is merged, and of a `oneof` the last member present wins.
//! Anything malformed is a [`DecodeError`], never a panic.

/// `Version` enum: what the proxy announces in [`ZdsHello`].
pub const VERSION_V1: u64 = 1;

/// Sent by the proxy as the first message of each connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZdsHello {
    /// Protocol version (`version = 1`); [`VERSION_V1`] is the only one defined.
    pub version: u64,
}

/// Who a pod is (`WorkloadInfo`): what its identity and its log lines are made of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadInfo {
    /// Pod name (`name = 1`).
    pub name: String,
    /// Kubernetes namespace (`namespace = 2`).
    pub namespace: String,
    /// Service account (`service_account = 3`).
    pub service_account: String,
}

/// A node agent's request (`WorkloadRequest`, a `oneof payload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadRequest {
    /// `add = 1` (`AddWorkload { uid = 1, workload_info = 2 }`); the pod's netns fd comes in
    /// SCM_RIGHTS beside the message.
    Add {
        /// Pod uid.
        uid: String,
        /// Who the pod is; required, though the field is optional on the wire.
        workload_info: Option<WorkloadInfo>,
    },
    /// `keep = 5` (`KeepWorkload { uid = 1 }`): keep this pod across the snapshot although the
    /// agent has no netns for it.
    Keep {
        /// Pod uid.
        uid: String,
    },
    /// `del = 2` (`DelWorkload { uid = 2 }`): the pod is gone.
    Del {
        /// Pod uid.
        uid: String,
    },
    /// `snapshot_sent = 3` (`SnapshotSent {}`): every current pod has been announced.
    SnapshotSent,
}

/// The proxy's answer to each request (`WorkloadResponse { ack = 1: Ack { error = 1 } }`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Empty for success, otherwise why the request failed.
    pub error: String,
}

/// Why bytes are not a valid ZDS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ends inside a field.
    #[error("message truncated inside a field")]
    Truncated,
    /// A varint is longer than 10 bytes or overflows 64 bits.
    #[error("invalid varint")]
    BadVarint,
    /// Field number 0 is reserved.
    #[error("field number 0")]
    FieldZero,
    /// Wire types 3 and 4 (groups), 6 and 7 do not occur in proto3.
    #[error("unsupported wire type {0}")]
    WireType(u8),
    /// A known field arrived with another wire type than its declared one.
    #[error("field {field} has wire type {got}, expected {want}")]
    WrongWireType {
        /// Field number.
        field: u32,
        /// Wire type found.
        got: u8,
        /// Wire type of the declared field.
        want: u8,
    },
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    Utf8(u32),
    /// A `WorkloadRequest` with none of its `oneof` members.
    #[error("request has no payload")]
    NoPayload,
}

const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_I32: u8 = 5;

/// One field as read off the wire.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed-width fields: no ZDS field has them, so only skipped.
    Fixed,
}

impl Value<'_> {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => WT_VARINT,
            Value::Bytes(_) => WT_LEN,
            Value::Fixed => WT_I64,
        }
    }
}

/// Iterates over the fields of one message.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.rest.split_first().ok_or(DecodeError::Truncated)?;
            self.rest = rest;
            // The tenth byte may only carry the top bit of a u64.
            if i == 9 && b > 1 {
                return Err(DecodeError::BadVarint);
            }
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::BadVarint)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        if n > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| DecodeError::BadVarint)?;
        if field == 0 {
            return Err(DecodeError::FieldZero);
        }
        // Masked to three bits, so the cast cannot truncate.
        let wire_type = (key & 7) as u8;
        let value = match wire_type {
            WT_VARINT => Value::Varint(self.varint()?),
            WT_LEN => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            WT_I64 => {
                self.take(8)?;
                Value::Fixed
            }
            WT_I32 => {
                self.take(4)?;
                Value::Fixed
            }
            other => return Err(DecodeError::WireType(other)),
        };
        Ok(Some((field, value)))
    }
}

fn want_bytes<'a>(field: u32, v: &Value<'a>) -> Result<&'a [u8], DecodeError> {
    match v {
        Value::Bytes(b) => Ok(b),
        other => Err(DecodeError::WrongWireType {
            field,
            got: other.wire_type(),
            want: WT_LEN,
        }),
    }
}

fn want_string(field: u32, v: &Value<'_>) -> Result<String, DecodeError> {
    let b = want_bytes(field, v)?;
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Utf8(field))
}

/// Decodes a message whose only known field (`uid_field`) is a string: Keep and Del.
fn decode_uid(bytes: &[u8], uid_field: u32, uid: &mut String) -> Result<(), DecodeError> {
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field()? {
        if field == uid_field {
            *uid = want_string(field, &v)?;
        }
    }
    Ok(())
}

impl WorkloadInfo {
    fn merge(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut f = Fields::new(bytes);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => self.name = want_string(field, &v)?,
                2 => self.namespace = want_string(field, &v)?,
                3 => self.service_account = want_string(field, &v)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, 1, &self.name);
        put_string(out, 2, &self.namespace);
        put_string(out, 3, &self.service_account);
    }
}

impl WorkloadRequest {
    /// Decodes one request (one SEQPACKET message).
    pub fn decode(bytes: &[u8]) -> Result<WorkloadRequest, DecodeError> {
        let mut payload: Option<WorkloadRequest> = None;
        let mut f = Fields::new(bytes);
        while let Some((field, v)) = f.next_field()? {
            // A oneof member seen again merges into the one present; another member replaces it.
            match field {
                1 => {
                    let b = want_bytes(field, &v)?;
                    let (mut uid, mut info) = match payload.take() {
                        Some(WorkloadRequest::Add { uid, workload_info }) => (uid, workload_info),
                        _ => (String::new(), None),
                    };
                    let mut fa = Fields::new(b);
                    while let Some((fld, va)) = fa.next_field()? {
                        match fld {
                            1 => uid = want_string(fld, &va)?,
                            2 => info
                                .get_or_insert_with(WorkloadInfo::default)
                                .merge(want_bytes(fld, &va)?)?,
                            _ => {}
                        }
                    }
                    payload = Some(WorkloadRequest::Add {
                        uid,
                        workload_info: info,
                    });
                }
                2 | 5 => {
                    let b = want_bytes(field, &v)?;
                    let mut uid = match payload.take() {
                        Some(WorkloadRequest::Del { uid }) if field == 2 => uid,
                        Some(WorkloadRequest::Keep { uid }) if field == 5 => uid,
                        _ => String::new(),
                    };
                    // DelWorkload keeps its uid in field 2, KeepWorkload in field 1.
                    decode_uid(b, if field == 2 { 2 } else { 1 }, &mut uid)?;
                    payload = Some(if field == 2 {
                        WorkloadRequest::Del { uid }
                    } else {
                        WorkloadRequest::Keep { uid }
                    });
                }
                3 => {
                    // SnapshotSent has no fields, but its body must still be well formed.
                    let mut fs = Fields::new(want_bytes(field, &v)?);
                    while fs.next_field()?.is_some() {}
                    payload = Some(WorkloadRequest::SnapshotSent);
                }
                _ => {}
            }
        }
        payload.ok_or(DecodeError::NoPayload)
    }

    /// Encodes the request as a node agent would.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let field = match self {
            WorkloadRequest::Add { uid, workload_info } => {
                put_string(&mut body, 1, uid);
                if let Some(info) = workload_info {
                    let mut b = Vec::new();
                    info.encode(&mut b);
                    put_bytes(&mut body, 2, &b);
                }
                1
            }
            WorkloadRequest::Keep { uid } => {
                put_string(&mut body, 1, uid);
                5
            }
            WorkloadRequest::Del { uid } => {
                put_string(&mut body, 2, uid);
                2
            }
            WorkloadRequest::SnapshotSent => 3,
        };
        let mut out = Vec::with_capacity(body.len() + 4);
        put_bytes(&mut out, field, &body);
        out
    }
}

impl ZdsHello {
    /// The hello ringtun sends: version V1.
    pub fn v1() -> Self {
        ZdsHello {
            version: VERSION_V1,
        }
    }

    /// Encodes the hello.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, self.version);
        out
    }

    /// Decodes a hello (what a node agent reads first).
    pub fn decode(bytes: &[u8]) -> Result<ZdsHello, DecodeError> {
        let mut hello = ZdsHello::default();
        let mut f = Fields::new(bytes);
        while let Some((field, v)) = f.next_field()? {
            if field == 1 {
                match v {
                    Value::Varint(n) => hello.version = n,
                    other => {
                        return Err(DecodeError::WrongWireType {
                            field,
                            got: other.wire_type(),
                            want: WT_VARINT,
                        })
                    }
                }
            }
        }
        Ok(hello)
    }
}

impl Ack {
    /// Success.
    pub fn ok() -> Self {
        Ack::default()
    }

    /// Encodes the ack as a `WorkloadResponse`.
    pub fn encode(&self) -> Vec<u8> {
        let mut ack = Vec::new();
        put_string(&mut ack, 1, &self.error);
        let mut out = Vec::with_capacity(ack.len() + 4);
        put_bytes(&mut out, 1, &ack);
        out
    }

    /// Decodes a `WorkloadResponse`; `None` when it carries no ack.
    pub fn decode_response(bytes: &[u8]) -> Result<Option<Ack>, DecodeError> {
        let mut ack = None;
        let mut f = Fields::new(bytes);
        while let Some((field, v)) = f.next_field()? {
            if field == 1 {
                let a: &mut Ack = ack.get_or_insert_with(Ack::default);
                decode_uid(want_bytes(field, &v)?, 1, &mut a.error)?;
            }
        }
        Ok(ack)
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        // Low seven bits plus the continuation bit: the cast keeps exactly those.
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, WT_LEN);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// proto3 leaves empty strings and zero scalars off the wire.
fn put_string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(out, field, s.as_bytes());
    }
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    if n != 0 {
        put_key(out, field, WT_VARINT);
        put_varint(out, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(ns: &str, name: &str, sa: &str) -> Option<WorkloadInfo> {
        Some(WorkloadInfo {
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }

    #[test]
    fn wire_bytes_match_zds_proto() {
        // What Go's protobuf encoder in istio-cni writes for each request.
        assert_eq!(ZdsHello::v1().encode(), [0x08, 0x01]);
        assert_eq!(WorkloadRequest::SnapshotSent.encode(), [0x1a, 0x00]);
        assert_eq!(
            WorkloadRequest::Del { uid: "u".into() }.encode(),
            [0x12, 0x03, 0x12, 0x01, b'u']
        );
        assert_eq!(
            WorkloadRequest::Keep { uid: "u".into() }.encode(),
            [0x2a, 0x03, 0x0a, 0x01, b'u']
        );
        let add = WorkloadRequest::Add {
            uid: "u".into(),
            workload_info: info("n", "p", "s"),
        };
        assert_eq!(
            add.encode(),
            [
                0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'p', 0x12, 0x01, b'n', 0x1a,
                0x01, b's'
            ]
        );
        assert_eq!(Ack::ok().encode(), [0x0a, 0x00]);
        assert_eq!(
            Ack { error: "x".into() }.encode(),
            [0x0a, 0x03, 0x0a, 0x01, b'x']
        );
    }

    #[test]
    fn decodes_requests_and_skips_unknown_fields() {
        // An unknown varint field (9) and an unknown fixed32 (10) around a Del.
        let mut b = vec![0x48, 0x05, 0x55, 1, 2, 3, 4];
        b.extend(WorkloadRequest::Del { uid: "x".into() }.encode());
        assert_eq!(
            WorkloadRequest::decode(&b),
            Ok(WorkloadRequest::Del { uid: "x".into() })
        );
        // The last oneof member wins.
        let mut b = WorkloadRequest::Keep { uid: "k".into() }.encode();
        b.extend(WorkloadRequest::SnapshotSent.encode());
        assert_eq!(
            WorkloadRequest::decode(&b),
            Ok(WorkloadRequest::SnapshotSent)
        );
        // An add sent in two pieces merges.
        let mut b = WorkloadRequest::Add {
            uid: "a".into(),
            workload_info: None,
        }
        .encode();
        b.extend(
            WorkloadRequest::Add {
                uid: String::new(),
                workload_info: info("ns", "", ""),
            }
            .encode(),
        );
        assert_eq!(
            WorkloadRequest::decode(&b),
            Ok(WorkloadRequest::Add {
                uid: "a".into(),
                workload_info: info("ns", "", "")
            })
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        use DecodeError::*;
        let cases: &[(&[u8], DecodeError)] = &[
            (&[], NoPayload),
            (&[0x48, 0x01], NoPayload),
            (&[0xff, 0xff, 0xff, 0xff], Truncated),
            (&[0x0a, 0x05, 0x0a], Truncated),
            (&[0x00, 0x00], FieldZero),
            (&[0x0b], WireType(3)),
            (&[0x0e], WireType(6)),
            (
                &[0x08, 0x01],
                WrongWireType {
                    field: 1,
                    got: 0,
                    want: 2,
                },
            ),
            (&[0x12, 0x03, 0x12, 0x01, 0xff], Utf8(2)),
            (
                &[
                    0x48, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
                ],
                BadVarint,
            ),
            (&[0x5d, 0x01], Truncated),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                WorkloadRequest::decode(bytes).as_ref(),
                Err(want),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn hello_and_ack_decode() {
        assert_eq!(ZdsHello::decode(&[0x08, 0x01]), Ok(ZdsHello::v1()));
        assert_eq!(ZdsHello::decode(&[]), Ok(ZdsHello { version: 0 }));
        assert_eq!(Ack::decode_response(&[]), Ok(None));
        assert_eq!(
            Ack::decode_response(&Ack::ok().encode()),
            Ok(Some(Ack::ok()))
        );
    }

    fn arb_info() -> impl Strategy<Value = Option<WorkloadInfo>> {
        proptest::option::of((".{0,20}", ".{0,20}", ".{0,20}").prop_map(|(n, ns, sa)| {
            WorkloadInfo {
                name: n,
                namespace: ns,
                service_account: sa,
            }
        }))
    }

    fn arb_request() -> impl Strategy<Value = WorkloadRequest> {
        prop_oneof![
            (".{0,40}", arb_info())
                .prop_map(|(uid, workload_info)| WorkloadRequest::Add { uid, workload_info }),
            ".{0,40}".prop_map(|uid| WorkloadRequest::Keep { uid }),
            ".{0,40}".prop_map(|uid| WorkloadRequest::Del { uid }),
            Just(WorkloadRequest::SnapshotSent),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = WorkloadRequest::decode(&bytes);
            let _ = ZdsHello::decode(&bytes);
            let _ = Ack::decode_response(&bytes);
        }

        #[test]
        fn requests_round_trip(req in arb_request()) {
            prop_assert_eq!(WorkloadRequest::decode(&req.encode()), Ok(req));
        }

        #[test]
        fn mutated_requests_never_panic(
            req in arb_request(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut b = req.encode();
            for (at, x) in flips {
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] ^= x;
                }
            }
            let _ = WorkloadRequest::decode(&b);
        }
    }
}
