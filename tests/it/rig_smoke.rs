//! The rig itself works: append over IMAP, send over SMTP, read both back over verified TLS.

use futures::TryStreamExt;

use crate::rig::Rig;

#[tokio::test]
async fn append_over_imap_and_send_over_smtp_then_read_both_over_tls() {
    let rig = Rig::start();
    rig.imap_append(
        "alice",
        "INBOX",
        b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: appended\r\nMessage-ID: <appended@example.test>\r\n\r\nvia APPEND\r\n",
    )
    .await;
    rig.send_smtp(
        "carol@example.test",
        &["alice@example.test"],
        b"From: carol@example.test\r\nTo: alice@example.test\r\nSubject: delivered\r\nMessage-ID: <smtp@example.test>\r\n\r\nvia SMTP and LMTP\r\n",
    )
    .await;

    let mut session = rig.imap("alice").await;
    let mailbox = session.examine("INBOX").await.unwrap();
    assert_eq!(mailbox.exists, 2);
    let fetched: Vec<_> = session
        .uid_fetch("1:*", "(UID BODY.PEEK[])")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let bodies: Vec<String> = fetched
        .iter()
        .map(|f| String::from_utf8_lossy(f.body().unwrap()).into_owned())
        .collect();
    assert_eq!(bodies.len(), 2);
    assert!(bodies[0].contains("Subject: appended"), "{}", bodies[0]);
    assert!(bodies[1].contains("Subject: delivered"), "{}", bodies[1]);
    session.logout().await.unwrap();

    // the server agrees, and BODY.PEEK left both unseen
    let status = rig.status("alice", "INBOX");
    assert_eq!(status.messages, 2);
    assert_eq!(status.unseen, 2);
}

#[tokio::test]
async fn untrusted_ca_is_refused() {
    let rig = Rig::shared();
    let tcp = tokio::net::TcpStream::connect((rig.host.as_str(), rig.imaps_port))
        .await
        .unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(crate::rig::tls_config_trusting(&rig.other_ca));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let err = connector.connect(name, tcp).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[test]
fn many_messages_and_per_test_mailboxes() {
    let rig = Rig::shared();
    let user = rig.new_mailbox("smoke");
    let msgs: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("Subject: m{i}\r\nMessage-ID: <m{i}@x>\r\n\r\nbody {i}\r\n").into_bytes())
        .collect();
    rig.append_many(&user, "INBOX", &msgs);
    rig.append(&user, "Sent", b"Subject: sent\r\n\r\nx\r\n");
    let inbox = rig.status(&user, "INBOX");
    assert_eq!((inbox.messages, inbox.uid_next), (50, 51));
    assert_eq!(rig.status(&user, "Sent").messages, 1);
    let flags = rig.flags(&user, "INBOX");
    assert_eq!(flags.len(), 50);
    assert!(flags.iter().all(|(_, f)| !f.contains("Seen")));
    let before = inbox.uid_validity;
    rig.set_uid_validity(&user, "INBOX", before + 7);
    assert_eq!(rig.status(&user, "INBOX").uid_validity, before + 7);
}
