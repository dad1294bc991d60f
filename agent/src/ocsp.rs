//! OCSP stapling from files: a certificate's `ocsp` file holds a DER OCSP response (fetched by
//! whatever the node runs for that; the agent fetches nothing). It is stapled while it says
//! the certificate is good and its nextUpdate has not passed; a stale, failed or non-good
//! response is not stapled, and `tlsplice_ocsp_response_stale` says so.

use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};

/// What a stapled response says, read from its first SingleResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OcspValidity {
    /// thisUpdate, seconds since the Unix epoch.
    pub this_update: i64,
    /// nextUpdate, seconds since the Unix epoch (`None`: the responder gave none, so newer
    /// information may be available at any time: treated as stale after a day).
    pub next_update: Option<i64>,
}

/// How long a response without nextUpdate is stapled.
const WITHOUT_NEXT_UPDATE: i64 = 86_400;

impl OcspValidity {
    /// Whether the response may still be stapled at `now` (seconds since the Unix epoch).
    pub fn fresh_at(&self, now: i64) -> bool {
        let until = self
            .next_update
            .unwrap_or(self.this_update + WITHOUT_NEXT_UPDATE);
        self.this_update <= now + 300 && now < until
    }
}

fn any(bytes: &[u8]) -> Result<(Any<'_>, &[u8]), String> {
    Any::from_der(bytes)
        .map(|(rest, a)| (a, rest))
        .map_err(|e| format!("not DER: {e}"))
}

fn is(a: &Any<'_>, class: Class, tag: u32) -> bool {
    a.class() == class && a.tag() == Tag(tag)
}

fn universal(a: &Any<'_>, tag: Tag, what: &str) -> Result<(), String> {
    if a.class() == Class::Universal && a.tag() == tag {
        Ok(())
    } else {
        Err(format!(
            "{what}: unexpected {:?} tag {}",
            a.class(),
            a.tag().0
        ))
    }
}

/// id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1), DER content.
const OCSP_BASIC: [u8; 9] = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

/// Reads an OCSP response (RFC 6960 4.2.1) for the certificate whose serial number's DER
/// content is `serial`: `Err` when it is not a successful basic response with a
/// SingleResponse for that serial number saying "good" (a response left over from the
/// certificate before a rotation is one for another serial).
pub fn validity(der: &[u8], serial: &[u8]) -> Result<OcspValidity, String> {
    let (outer, _) = any(der)?;
    universal(&outer, Tag::Sequence, "OCSPResponse")?;
    let (status, rest) = any(outer.data)?;
    universal(&status, Tag::Enumerated, "responseStatus")?;
    match status.data {
        [0] => {}
        [n] => return Err(format!("responseStatus {n} (not successful)")),
        _ => return Err("responseStatus: malformed".into()),
    }
    let (bytes, _) = any(rest).map_err(|_| "no responseBytes".to_owned())?;
    if !is(&bytes, Class::ContextSpecific, 0) {
        return Err("no responseBytes".into());
    }
    let (response_bytes, _) = any(bytes.data)?;
    let (kind, rest) = any(response_bytes.data)?;
    if kind.tag() != Tag::Oid || kind.data != OCSP_BASIC {
        return Err("not a basic OCSP response (id-pkix-ocsp-basic)".into());
    }
    let (octets, _) = any(rest)?;
    universal(&octets, Tag::OctetString, "response")?;
    let (basic, _) = any(octets.data)?;
    universal(&basic, Tag::Sequence, "BasicOCSPResponse")?;
    let (tbs, _) = any(basic.data)?;
    universal(&tbs, Tag::Sequence, "ResponseData")?;
    // version [0] (optional), responderID [1] or [2], producedAt, responses.
    let mut rest = tbs.data;
    let (mut field, mut after) = any(rest)?;
    if is(&field, Class::ContextSpecific, 0) {
        rest = after;
        (field, after) = any(rest)?;
    }
    if !(is(&field, Class::ContextSpecific, 1) || is(&field, Class::ContextSpecific, 2)) {
        return Err("responderID: missing".into());
    }
    let (produced, after) = any(after)?;
    universal(&produced, Tag::GeneralizedTime, "producedAt")?;
    let (responses, _) = any(after)?;
    universal(&responses, Tag::Sequence, "responses")?;
    // The SingleResponse for this certificate.
    let mut left = responses.data;
    let single = loop {
        if left.is_empty() {
            return Err("no response for this certificate's serial number".into());
        }
        let (single, rest) = any(left)?;
        universal(&single, Tag::Sequence, "SingleResponse")?;
        let (cert_id, _) = any(single.data)?;
        universal(&cert_id, Tag::Sequence, "CertID")?;
        let (_hash, rest_id) = any(cert_id.data)?;
        let (_name_hash, rest_id) = any(rest_id)?;
        let (_key_hash, rest_id) = any(rest_id)?;
        let (number, _) = any(rest_id)?;
        universal(&number, Tag::Integer, "serialNumber")?;
        if number.data == serial {
            break single;
        }
        left = rest;
    };
    let (_cert_id, after) = any(single.data)?;
    let (status, after) = any(after)?;
    match (status.class(), status.tag().0) {
        (Class::ContextSpecific, 0) => {}
        (Class::ContextSpecific, 1) => return Err("the certificate is revoked".into()),
        _ => return Err("the certificate's status is unknown".into()),
    }
    let (this_update, after) = any(after)?;
    universal(&this_update, Tag::GeneralizedTime, "thisUpdate")?;
    let this_update = generalized_time(this_update.data)?;
    let next_update = match any(after) {
        Ok((next, _)) if is(&next, Class::ContextSpecific, 0) => {
            let (time, _) = any(next.data)?;
            universal(&time, Tag::GeneralizedTime, "nextUpdate")?;
            Some(generalized_time(time.data)?)
        }
        _ => None,
    };
    Ok(OcspValidity {
        this_update,
        next_update,
    })
}

/// `YYYYMMDDHHMMSS[.f*]Z` as seconds since the Unix epoch.
fn generalized_time(text: &[u8]) -> Result<i64, String> {
    let bad = || format!("GeneralizedTime {:?}", String::from_utf8_lossy(text));
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    let text = text.strip_suffix('Z').ok_or_else(bad)?;
    let whole = text.split('.').next().ok_or_else(bad)?;
    if whole.len() != 14 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| whole[r].parse::<i64>().map_err(|_| bad());
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(8..10)?, num(10..12)?, num(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    Ok(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_times_read_as_unix_seconds() {
        for (text, want) in [
            ("19700101000000Z", Some(0)),
            ("20000301000000Z", Some(951_868_800)),
            ("20261207183000Z", Some(1_796_668_200)),
            ("20261207183000.123Z", Some(1_796_668_200)),
            ("20261207183000", None),
            ("2026120718300Z", None),
            ("20261307183000Z", None),
        ] {
            assert_eq!(generalized_time(text.as_bytes()).ok(), want, "{text}");
        }
    }

    #[test]
    fn freshness_follows_next_update() {
        let v = OcspValidity {
            this_update: 1000,
            next_update: Some(2000),
        };
        assert!(v.fresh_at(1500));
        assert!(!v.fresh_at(2000));
        assert!(
            !v.fresh_at(500),
            "a response from the future (beyond 5 min of skew)"
        );
        let open = OcspValidity {
            this_update: 1000,
            next_update: None,
        };
        assert!(open.fresh_at(1000 + WITHOUT_NEXT_UPDATE - 1));
        assert!(!open.fresh_at(1000 + WITHOUT_NEXT_UPDATE));
    }

    #[test]
    fn what_is_not_an_ocsp_response_is_refused() {
        assert!(validity(b"", &[1]).is_err());
        assert!(
            validity(&[0x30, 0x03, 0x0a, 0x01, 0x01], &[1])
                .unwrap_err()
                .contains("responseStatus 1")
        );
        assert!(
            validity(&[0x30, 0x03, 0x0a, 0x01, 0x00], &[1])
                .unwrap_err()
                .contains("responseBytes")
        );
    }
}
