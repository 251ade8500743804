//! AES-GCM straight between the caller's buffers: sealing from the writer's slices into the
//! output, opening into the reader's buffer.
//!
//! aws-lc-rs seals and opens in place only (or from one contiguous slice). A record made of an
//! h2 frame head and a payload slice had to be copied into the output first and encrypted
//! there (on the sending side of a bulk transfer 0.08–0.10 CPU seconds per GiB, 5–7% of the
//! tunnel pair's CPU, round 16's profile), and a received record, opened in place in the
//! socket's buffer, was copied again into h2's. aws-lc's streaming cipher API
//! (`EVP_CipherUpdate`) writes each piece's output where the caller says as it reads it, so
//! the bytes are read once, by the cipher. The records are the same, byte for byte (tested
//! against aws-lc-rs' one-shot seal below and against rustls in `userspace`).
//!
//! Opening writes plaintext before the tag is checked, so what [`GcmCipher::open`] wrote is
//! the caller's to discard unless it returns `true`; the caller writes only into memory its
//! reader does not see yet (a `ReadBuf`'s unfilled part).

use std::mem::MaybeUninit;
use std::os::raw::c_int;
use std::ptr;

use aws_lc_sys::{
    EVP_CIPHER_CTX_ctrl, EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new, EVP_CipherFinal_ex,
    EVP_CipherInit_ex, EVP_CipherUpdate, EVP_aes_128_gcm, EVP_aes_256_gcm, EVP_CIPHER_CTX,
    EVP_CTRL_GCM_GET_TAG, EVP_CTRL_GCM_SET_TAG,
};

use crate::Cipher;

/// AES-GCM's tag length.
pub const TAG: usize = 16;

/// One keyed AES-GCM context; each [`GcmCipher::seal`] or [`GcmCipher::open`] sets the
/// record's nonce and direction (the key schedule is the same both ways).
pub struct GcmCipher {
    ctx: *mut EVP_CIPHER_CTX,
}

// SAFETY: the context is owned by this value alone and only used through `&mut self`; aws-lc
// keeps no thread affinity for it.
unsafe impl Send for GcmCipher {}

impl Drop for GcmCipher {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from EVP_CIPHER_CTX_new and is freed once; freeing cleans the
        // key schedule.
        unsafe { EVP_CIPHER_CTX_free(self.ctx) }
    }
}

/// aws-lc's `enc` argument: decrypt.
const OPEN: c_int = 0;
/// aws-lc's `enc` argument: encrypt.
const SEAL: c_int = 1;

impl GcmCipher {
    /// A context for `cipher` with `key`; `None` for a cipher that is not AES-GCM, a key of
    /// the wrong length, or an allocation that failed (the caller works in place instead).
    pub fn new(cipher: Cipher, key: &[u8]) -> Option<Self> {
        // SAFETY: the EVP_aes_*_gcm functions return static descriptions.
        let evp = match cipher {
            Cipher::Aes128Gcm => unsafe { EVP_aes_128_gcm() },
            Cipher::Aes256Gcm => unsafe { EVP_aes_256_gcm() },
            Cipher::Chacha20Poly1305 => return None,
        };
        if key.len() != cipher.key_len() {
            return None;
        }
        // SAFETY: plain allocation; checked for null.
        let ctx = unsafe { EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return None;
        }
        let gcm = GcmCipher { ctx };
        // SAFETY: `ctx` is live, `key` holds the cipher's key length; no IV yet (set per
        // record). GCM's default IV length is 12 bytes, TLS 1.3's nonce length.
        let ok = unsafe {
            EVP_CipherInit_ex(ctx, evp, ptr::null_mut(), key.as_ptr(), ptr::null(), SEAL)
        };
        (ok == 1).then_some(gcm)
    }

    /// Starts a record: direction, nonce, additional data.
    fn start(&mut self, enc: c_int, nonce: &[u8; 12], aad: &[u8]) -> bool {
        let Ok(aad_len) = c_int::try_from(aad.len()) else {
            return false;
        };
        let mut n: c_int = 0;
        // SAFETY: `self.ctx` is live and keyed; the nonce is the 12 bytes GCM was set up
        // for; additional data goes in with no output buffer.
        unsafe {
            EVP_CipherInit_ex(
                self.ctx,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                nonce.as_ptr(),
                enc,
            ) == 1
                && EVP_CipherUpdate(self.ctx, ptr::null_mut(), &mut n, aad.as_ptr(), aad_len) == 1
        }
    }

    /// Runs `len` bytes from `input` through the cipher into `output`, which may be `input`
    /// itself (exactly, not overlapping otherwise).
    ///
    /// # Safety
    ///
    /// `input` must be readable and `output` writable for `len` bytes, and the context must
    /// be started.
    unsafe fn update(&mut self, output: *mut u8, input: *const u8, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let Ok(want) = c_int::try_from(len) else {
            return false;
        };
        let mut n: c_int = 0;
        // SAFETY: the caller's contract; GCM writes exactly as many bytes as it reads.
        unsafe { EVP_CipherUpdate(self.ctx, output, &mut n, input, want) == 1 && n == want }
    }

    /// Seals `parts` followed by `last` (the record's inner content type) under `nonce` and
    /// `aad` into `out`, which must be exactly as long as the parts, `last` and the tag: the
    /// ciphertext, then the tag. On `true` every byte of `out` was written. `false` if `out`
    /// has another length or aws-lc refused (it does only for lengths over `c_int`; a record
    /// is at most 2^14 bytes).
    pub fn seal(
        &mut self,
        nonce: &[u8; 12],
        aad: &[u8],
        parts: &[&[u8]],
        last: u8,
        out: &mut [MaybeUninit<u8>],
    ) -> bool {
        let want: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 1;
        if out.len() != want + TAG || !self.start(SEAL, nonce, aad) {
            return false;
        }
        let mut at = 0;
        let last = [last];
        for p in parts.iter().copied().chain(std::iter::once(&last[..])) {
            // SAFETY: `out[at..]` has room for `p`: the lengths were checked above and `at`
            // advances by what was written.
            if !unsafe { self.update(out[at..].as_mut_ptr().cast(), p.as_ptr(), p.len()) } {
                return false;
            }
            at += p.len();
        }
        let mut n: c_int = 0;
        // SAFETY: the context is started; GCM's final step writes nothing (checked), and the
        // tag fills the last TAG bytes of `out`.
        unsafe {
            EVP_CipherFinal_ex(self.ctx, out[at..].as_mut_ptr().cast(), &mut n) == 1
                && n == 0
                && EVP_CIPHER_CTX_ctrl(
                    self.ctx,
                    EVP_CTRL_GCM_GET_TAG as c_int,
                    TAG as c_int,
                    out[at..].as_mut_ptr().cast(),
                ) == 1
        }
    }

    /// Opens a ciphertext cut in two under `nonce` and `aad`, checking `tag`: `head`'s bytes
    /// are decrypted into `head_out` (as long as `head`), `tail`'s in place. `true` when the
    /// record is authentic; otherwise both outputs are zeroed (as aws-lc's one-shot open does),
    /// so no unauthenticated plaintext outlives the call.
    pub fn open(
        &mut self,
        nonce: &[u8; 12],
        aad: &[u8],
        head: &[u8],
        head_out: &mut [MaybeUninit<u8>],
        tail: &mut [u8],
        tag: &[u8; TAG],
    ) -> bool {
        if head.len() != head_out.len() || !self.start(OPEN, nonce, aad) {
            return false;
        }
        let tail_ptr = tail.as_mut_ptr();
        let mut n: c_int = 0;
        // The final step writes nothing for GCM; it gets somewhere to write all the same.
        let mut scratch = [0u8; TAG];
        // SAFETY: the context is started; `head_out` is as long as `head` (checked); `tail`
        // is decrypted onto itself (aws-lc's GCM allows exactly aliased input and output);
        // the tag is TAG bytes, set in decrypt mode before the final step, which compares it
        // in constant time and writes nothing.
        let authentic = unsafe {
            self.update(head_out.as_mut_ptr().cast(), head.as_ptr(), head.len())
                && self.update(tail_ptr, tail_ptr, tail.len())
                && EVP_CIPHER_CTX_ctrl(
                    self.ctx,
                    EVP_CTRL_GCM_SET_TAG as c_int,
                    TAG as c_int,
                    tag.as_ptr().cast_mut().cast(),
                ) == 1
                && EVP_CipherFinal_ex(self.ctx, scratch.as_mut_ptr(), &mut n) == 1
                && n == 0
        };
        if !authentic {
            head_out.fill(MaybeUninit::new(0));
            tail.fill(0);
        }
        authentic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};

    /// Bytes the cipher wrote (every one: the callers check that it succeeded, or rely on a
    /// refused open zeroing its output).
    fn written(out: &[MaybeUninit<u8>]) -> Vec<u8> {
        // SAFETY: initialised, as above.
        out.iter().map(|b| unsafe { b.assume_init() }).collect()
    }

    /// aws-lc-rs' one-shot seal of `plain` and the type byte `last`: ciphertext, then tag.
    fn one_shot(
        key: &LessSafeKey,
        nonce: [u8; 12],
        aad: [u8; 5],
        plain: &[u8],
        last: u8,
    ) -> Vec<u8> {
        let mut sealed = plain.to_vec();
        sealed.push(last);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .expect("seal");
        sealed.extend_from_slice(tag.as_ref());
        sealed
    }

    /// The streaming seal gives aws-lc-rs' in-place seal's bytes, for any split of the
    /// plaintext into slices (empty ones included) and both key sizes.
    #[test]
    fn same_bytes_as_the_in_place_seal_for_any_split() {
        let mut data = vec![0u8; 20_000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 31 + i / 7) as u8;
        }
        let splits: [&[usize]; 6] = [
            &[],
            &[9],
            &[0, 9, 9],
            &[1, 2, 3, 15, 16, 17],
            &[9, 16375],
            &[4000, 4001, 10_000],
        ];
        for (cipher, alg, key) in [
            (Cipher::Aes128Gcm, &AES_128_GCM, &[7u8; 16][..]),
            (Cipher::Aes256Gcm, &AES_256_GCM, &[9u8; 32][..]),
        ] {
            let mut sealer = GcmCipher::new(cipher, key).expect("sealer");
            let reference = LessSafeKey::new(UnboundKey::new(alg, key).expect("key"));
            for (r, cuts) in splits.iter().enumerate() {
                for len in [0usize, 1, 15, 16, 17, 1000, 16_383] {
                    let plain = &data[r..r + len];
                    let mut parts = Vec::new();
                    let mut at = 0;
                    for &c in cuts.iter() {
                        let end = (at + c).min(len);
                        parts.push(&plain[at..end]);
                        at = end;
                    }
                    parts.push(&plain[at..]);
                    let nonce = [r as u8 ^ len as u8; 12];
                    let aad = [23u8, 3, 3, (len >> 8) as u8, len as u8];

                    let mut out = vec![MaybeUninit::new(0u8); len + 1 + TAG];
                    assert!(sealer.seal(&nonce, &aad, &parts, 23, &mut out));
                    assert_eq!(
                        written(&out),
                        one_shot(&reference, nonce, aad, plain, 23),
                        "{cipher:?} split {cuts:?} len {len}"
                    );
                }
            }
        }
    }

    /// One context seals and opens in turn (the direction is set per record), and a record
    /// with a wrong tag is refused and zeroed without spoiling the next one.
    #[test]
    fn one_context_seals_and_opens_in_turn() {
        let key = [3u8; 16];
        let reference = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).expect("key"));
        let mut gcm = GcmCipher::new(Cipher::Aes128Gcm, &key).expect("context");
        let plain: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
        let aad = [23u8, 3, 3, 0x13, 0x99];
        for round in 0..3u8 {
            let nonce = [round; 12];
            let mut sealed = vec![MaybeUninit::new(0u8); plain.len() + 1 + TAG];
            assert!(gcm.seal(
                &nonce,
                &aad,
                &[&plain[..100], &plain[100..]],
                23,
                &mut sealed
            ));
            let sealed = written(&sealed);
            assert_eq!(
                sealed,
                one_shot(&reference, nonce, aad, &plain, 23),
                "round {round}"
            );

            let (body, tag) = sealed.split_at(sealed.len() - TAG);
            let tag: &[u8; TAG] = tag.try_into().expect("tag");
            let cut = 1234 + usize::from(round);
            for forged in [true, false] {
                let mut tag = *tag;
                tag[0] ^= u8::from(forged);
                let mut head_out = vec![MaybeUninit::new(0xAAu8); cut];
                let mut tail = body[cut..].to_vec();
                let ok = gcm.open(&nonce, &aad, &body[..cut], &mut head_out, &mut tail, &tag);
                assert_eq!(ok, !forged, "round {round}");
                // Open writes (or zeroes) all of `head_out`.
                let mut got = written(&head_out);
                got.extend(tail);
                if forged {
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "a refused record leaves nothing"
                    );
                } else {
                    assert_eq!(&got[..plain.len()], &plain[..]);
                    assert_eq!(got[plain.len()], 23);
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_seal() {
        assert!(GcmCipher::new(Cipher::Chacha20Poly1305, &[0; 32]).is_none());
        assert!(GcmCipher::new(Cipher::Aes128Gcm, &[0; 32]).is_none());
        let mut s = GcmCipher::new(Cipher::Aes128Gcm, &[0; 16]).expect("sealer");
        let room = |n| vec![MaybeUninit::new(0u8); n];
        // The output must be exactly the parts, the type byte and the tag.
        assert!(!s.seal(&[0; 12], &[], &[b"abc"], 23, &mut room(3 + 1)));
        assert!(s.seal(&[0; 12], &[], &[b"abc"], 23, &mut room(3 + 1 + TAG)));
    }
}
