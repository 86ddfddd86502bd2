//! Fuzz target: any body, under any preset and content type, through authentication and mapping.
//!
//! Byte 0 picks the preset, byte 1 the content type and scheme, the rest is the body. Invariants:
//! no panic; a stored message keeps the exact body; the delivery id is short and has no control
//! characters; verification of an unsigned body never succeeds.
#![no_main]

use chrono::{TimeZone, Utc};
use frontdesk::ingest::webhook::auth::{Inbound, Scheme, Verifier};
use frontdesk::ingest::webhook::preset::{self, Delivery, Mapping, Outcome, Preset};
use frontdesk::message::Origin;
use libfuzzer_sys::fuzz_target;

fn preset_for(b: u8) -> Preset {
    match b % 9 {
        0 => Preset::Form,
        1 => Preset::Json(Box::new(Mapping {
            id: Some("/id".into()),
            from: Some("/a/0/from".into()),
            subject: Some("/s".into()),
            occurred_at: Some("/t".into()),
            ..Mapping::default()
        })),
        2 => Preset::TwilioSms,
        3 => Preset::SlackEvents,
        4 => Preset::StandardWebhooks,
        5 => Preset::Github,
        6 => Preset::Stripe,
        7 => Preset::PostmarkInbound,
        _ => Preset::MailgunInbound,
    }
}

const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=B",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let preset = preset_for(data[0]);
    let body = &data[2..];
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "content-type",
        axum::http::HeaderValue::from_static(CONTENT_TYPES[usize::from(data[1]) % 4]),
    );
    headers.insert("x-github-event", axum::http::HeaderValue::from_static("issues"));
    let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let d = Delivery {
        source: "fuzz",
        headers: &headers,
        body,
        received_at: now,
        signed_at: None,
    };
    if let Ok(Outcome::Store(m)) = preset::normalize(&preset, &d) {
        assert_eq!(m.raw, body);
        let Origin::Webhook { delivery_id } = &m.origin else {
            panic!("webhook origin expected")
        };
        assert!(!delivery_id.is_empty() && delivery_id.len() <= 200);
        assert!(!delivery_id.chars().any(char::is_control));
    }
    // Schemes whose signature lives in the body (Mailgun) or covers parsed form fields (Twilio).
    let schemes = [
        Scheme::Mailgun,
        Scheme::Twilio {
            public_url: "https://h.example/hooks/sms".into(),
        },
        Scheme::Stripe,
    ];
    let scheme = schemes[usize::from(data[1] / 4) % 3].clone();
    let verifier =
        Verifier::new(scheme, &["fuzz-secret".into()], std::time::Duration::from_secs(300))
            .unwrap();
    if let Ok(sig) = std::str::from_utf8(&body[..body.len().min(64)])
        && let Ok(v) = axum::http::HeaderValue::from_str(sig)
    {
        headers.insert("stripe-signature", v.clone());
        headers.insert("x-twilio-signature", v);
    }
    let r = verifier.verify(
        &Inbound {
            headers: &headers,
            query: Some("a=1"),
            body,
        },
        now,
    );
    // Guessing a 256-bit (or 160-bit) MAC is not something a fuzzer does; success means a bug.
    assert!(r.is_err(), "unsigned input verified");
});
