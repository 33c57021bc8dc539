//! A destination facing a source that is not a well-behaved ferry: connections that are no
//! migration stream, which it drops while it waits on; a stream it cannot read, and a source
//! that gives up part way, which fail it at once, with the source's words where it had any. It
//! never runs a guest it did not receive whole.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry::machine::devices::Serial;
use ferry::machine::state::{KvmVcpu, KvmVm};
use ferry::migrate::lanes::CONNECT_DEADLINE;
use ferry::migrate::params::SWITCHOVER_DEADLINE_MIN;
use ferry::migrate::state::{Section, VmDescription};
use ferry::migrate::wire::{self, Commit, LaneHello, LaneOffer, Message, PageEntry};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::{self, free_port, kvm_turn, migrate_to_silent_destination, scratch, Transport};

/// The guest both the real and the fake sources describe.
const MEM_MIB: &str = "64";

/// Strangers at the `-incoming` port (a port scan, an HTTP health check, a stream cut short
/// before its header, a connection that says nothing) are dropped, and the source that comes
/// after them migrates.
#[test]
fn strangers_at_the_incoming_port_do_not_stop_the_migration() {
    let Some((_lock, mut world)) = super::kvm_world(Transport::Tcp) else {
        return;
    };
    let source = world.source(1);
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let destination = world.destination(1, &uri, false);
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    drop(connect());
    connect()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    connect().write_all(&wire::header()[..10]).unwrap();
    let _silent = connect();
    super::migrate(&source, &uri);
    assert_eq!(destination.qmp().status(), "running");
    let stderr = destination.stderr();
    assert!(
        stderr
            .matches("dropped a connection that is not a ferry source")
            .count()
            >= 3,
        "{stderr}"
    );
}

/// Streams a destination cannot take (another version's, a frame over the limit): it fails
/// with a clear message and never runs the guest.
#[test]
fn destination_refuses_streams_it_cannot_read() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let mut huge_frame = wire::header().to_vec();
    huge_frame.extend_from_slice(&3u32.to_le_bytes());
    huge_frame.extend_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "version",
            [&b"FERRYMIG"[..], &[9, 0, 0, 0, 0, 0, 0, 0]].concat(),
            "version 9",
        ),
        ("oversized frame", huge_frame, "over the"),
    ];
    for (name, bytes, expected) in cases {
        let port = free_port();
        let uri = format!("tcp:127.0.0.1:{port}");
        let qmp = dir.path().join(format!("{}.qmp", name.replace(' ', "-")));
        let mut destination = common::start(name, &["-m", "64", "-incoming", &uri], Some(&qmp));
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(&bytes).unwrap();
        drop(stream);
        let status = destination.wait_exit(Duration::from_secs(10));
        assert!(!status.success(), "{name}: the destination exited 0");
        assert!(
            destination.stderr().contains(expected),
            "{name}: {}",
            destination.stderr()
        );
        assert!(
            !destination.stderr().contains("panicked"),
            "{name}: {}",
            destination.stderr()
        );
        assert_eq!(
            destination.line_count(),
            0,
            "{name}: the destination ran the guest"
        );
    }
}

/// The configuration a real source with `-m MEM_MIB` sends: one a destination started alike
/// accepts. It is read off a migration to this test, which then hangs up.
fn real_config(dir: &Path, runtime: &tokio::runtime::Runtime) -> Box<VmDescription> {
    let qmp = dir.join("config-source.qmp");
    let source = common::start("config-source", &["-m", MEM_MIB], Some(&qmp));
    source.wait_ready();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let uri = format!("tcp:127.0.0.1:{port}");
        source.qmp().ok("migrate", Some(json!({ "uri": uri })));
        common::accept_config(&listener).await.1
    })
}

/// How the fake source says its last word while its page connections open.
#[derive(Clone, Copy)]
enum Saying {
    /// The whole frame, before opening any page connection.
    AtOnce,
    /// Half the frame, then both page connections, then the rest: the destination must not
    /// lose the half it read when the connections arrived.
    AroundTheConnections,
}

/// A source that announces page connections and then, before opening any, cancels or fails:
/// the destination hears it on the control connection at once, and fails with its reason,
/// rather than wait out the page connections' deadline and blame them.
#[test]
fn a_destination_hears_a_source_that_gives_up_while_its_page_connections_open() {
    gives_up_while_page_connections_open(Saying::AtOnce);
}

/// As above, with the last word split around the page connections' arrival.
#[test]
fn a_destination_hears_a_last_word_split_around_the_page_connections() {
    gives_up_while_page_connections_open(Saying::AroundTheConnections);
}

fn gives_up_while_page_connections_open(saying: Saying) {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let runtime = common::runtime();
    let config = real_config(dir.path(), &runtime);
    let cases = [
        (
            "cancel",
            Message::Cancel,
            "the source cancelled the migration",
        ),
        (
            "error",
            Message::Error("the source's disk went away".into()),
            "the source's disk went away",
        ),
    ];
    for (name, last_word, expected) in cases {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let qmp = dir.path().join(format!("{name}.qmp"));
        let args = ["-m", MEM_MIB, "-incoming", &uri];
        let mut destination = common::start(name, &args, Some(&qmp));
        let address = uri.trim_start_matches("tcp:").to_owned();
        let said = Instant::now();
        // Held open until the destination has exited: it must act on the message, not on a
        // hang-up.
        let _connections = runtime.block_on(fake_source(&address, &config, &last_word, saying));
        let status = destination.wait_exit(CONNECT_DEADLINE * 2);
        let waited = said.elapsed();
        let stderr = destination.stderr();
        assert!(!status.success(), "{name}: the destination exited 0");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            waited < CONNECT_DEADLINE / 2,
            "{name}: the destination took {waited:?} to give up, as if it had waited for the \
             page connections: {stderr}"
        );
        assert_eq!(
            destination.line_count(),
            0,
            "{name}: the destination ran the guest"
        );
    }
}

/// Offers two page connections, then says `last_word` as `saying` has it. Returns every
/// connection it opened.
async fn fake_source(
    address: &str,
    config: &VmDescription,
    last_word: &Message,
    saying: Saying,
) -> Vec<tokio::net::TcpStream> {
    let mut control = tokio::net::TcpStream::connect(address).await.unwrap();
    // Each write goes out as it is made, not when the last is acknowledged.
    control.set_nodelay(true).unwrap();
    control.write_all(&wire::header()).await.unwrap();
    let config = Message::Config(Box::new(config.clone()));
    wire::write_message(&mut control, &config).await.unwrap();
    let answer = wire::read_message(&mut control).await;
    assert!(matches!(answer, Ok(Message::Accept)), "{answer:?}");
    let offer = LaneOffer {
        count: 2,
        session: 7,
    };
    wire::write_message(&mut control, &Message::Lanes(offer))
        .await
        .unwrap();
    let frame = wire::encode_message(last_word).unwrap();
    let (first, rest) = match saying {
        Saying::AtOnce => (&frame[..], &[][..]),
        Saying::AroundTheConnections => frame.split_at(frame.len() / 2),
    };
    control.write_all(first).await.unwrap();
    let mut connections = Vec::new();
    if let Saying::AroundTheConnections = saying {
        // Long enough for the destination to read the half.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for index in 0..offer.count {
            let mut lane = tokio::net::TcpStream::connect(address).await.unwrap();
            lane.write_all(&wire::header()).await.unwrap();
            let hello = Message::Lane(LaneHello {
                index,
                session: offer.session,
            });
            wire::write_message(&mut lane, &hello).await.unwrap();
            connections.push(lane);
        }
        // Long enough for a destination that goes on waiting for the connections to take both
        // in (a few ms here), and well within the 200 ms in which a destination that heard the
        // half waits for the rest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.write_all(rest).await.unwrap();
    connections.push(control);
    connections
}

/// A source whose state the destination cannot take (here, none of its parts): the destination
/// checks the state before it says READY, so it answers ERROR at once, while the source still
/// holds its disks, and it never runs the guest.
#[test]
fn a_destination_refuses_a_state_it_cannot_take_before_saying_ready() {
    let Some(answers) = answers_to(vec![Message::State(Vec::new())]) else {
        return;
    };
    match &answers[..] {
        [Message::Error(reason)] => {
            assert!(reason.contains("cannot take the state"), "{reason}");
            assert!(reason.contains("the stream has no state for"), "{reason}");
        }
        other => panic!("the destination answered the state with {other:?}"),
    }
}

/// A real source's state, altered so that it no longer fits: the destination refuses what it can
/// check before it says READY (interrupt controllers out of place, a UART FIFO overfull) with
/// ERROR at once, while the source still holds its disks; what only KVM judges (vCPU 0 with
/// paging on and protection off) it finds while restoring, after READY, and answers the COMMIT
/// with ERROR, on which a source runs the guest again. Either way it never runs the guest.
#[test]
fn a_destination_refuses_a_real_state_that_does_not_fit() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    // A real source's configuration and state, as a destination that never says READY hears
    // them; the source gives up at its switchover deadline and hangs up.
    let qmp = dir.path().join("state-source.qmp");
    let source = common::start("state-source", &["-m", MEM_MIB], Some(&qmp));
    source.wait_ready();
    let mut qmp = source.qmp();
    let listening = migrate_to_silent_destination(&mut qmp, true);
    let ended = ["completed", "failed", "canceled"];
    let info = qmp.wait_migration(&ended, SWITCHOVER_DEADLINE_MIN * 3);
    assert_eq!(info["status"], "failed", "{info}");
    let heard = listening.join().unwrap();
    let config = heard.config.expect("the source sent no configuration");
    let state = heard.state.expect("the source sent no state");
    let runtime = common::runtime();

    let mut misplaced = state.clone();
    let chips = misplaced.iter_mut().find(|s| s.id == "kvm").unwrap();
    let mut chip_state = chips.decode::<KvmVm>().unwrap();
    std::mem::swap(&mut chip_state.pic_master, &mut chip_state.pic_slave);
    chips.data = postcard::to_stdvec(&chip_state).unwrap();
    let answers = play_state(dir.path(), &runtime, config.clone(), misplaced);
    match &answers[..] {
        [Message::Error(reason)] => assert!(reason.contains("irqchip"), "{reason}"),
        other => panic!("the destination answered the state with {other:?}"),
    }

    let mut overfull = state.clone();
    let serial = overfull.iter_mut().find(|s| s.id == "serial0").unwrap();
    let mut uart = serial.decode::<Serial>().unwrap();
    uart.in_buffer = vec![b'x'; 65];
    serial.data = postcard::to_stdvec(&uart).unwrap();
    let answers = play_state(dir.path(), &runtime, config.clone(), overfull);
    match &answers[..] {
        [Message::Error(reason)] => assert!(reason.contains("receive FIFO"), "{reason}"),
        other => panic!("the destination answered the state with {other:?}"),
    }

    let mut unrunnable = state;
    let vcpu = unrunnable.iter_mut().find(|s| s.id == "vcpu0").unwrap();
    let mut vcpu_state = vcpu.decode::<KvmVcpu>().unwrap();
    vcpu_state.sregs.cr0 = CR0_PAGING;
    vcpu.data = postcard::to_stdvec(&vcpu_state).unwrap();
    let answers = play_state(dir.path(), &runtime, config, unrunnable);
    match &answers[..] {
        [Message::Ready, Message::Error(reason)] => {
            assert!(reason.contains("special registers"), "{reason}")
        }
        other => panic!("the destination answered the state and the commit with {other:?}"),
    }
}

/// Zero runs are only valid before round 0's first SYNC: after it pages may have landed, and on
/// preallocated RAM a zero run would not clear them. A destination refuses later ones.
#[test]
fn a_destination_refuses_zero_runs_once_pages_may_have_landed() {
    let late_zeros = Message::Zeros(vec![(0x10_0000, 1)]);
    let Some(answers) = answers_to(vec![Message::Sync, late_zeros]) else {
        return;
    };
    match &answers[..] {
        [Message::Synced, Message::Error(reason)] => {
            assert!(
                reason.contains("zero runs after round 0's first SYNC"),
                "{reason}"
            );
        }
        other => panic!("the destination answered late zero runs with {other:?}"),
    }
}

/// Page data comes only after round 0's zero runs end (its first SYNC): a zero run after the
/// data could not clear it on preallocated RAM. A destination refuses data before that.
#[test]
fn a_destination_refuses_page_data_before_the_first_sync() {
    let early_page = Message::Pages {
        entries: vec![PageEntry {
            gpa: 0x10_0000,
            zero: false,
        }],
        data: vec![0xa5; 4096].into(),
    };
    let Some(answers) = answers_to(vec![early_page]) else {
        return;
    };
    match &answers[..] {
        [Message::Error(reason)] => {
            assert!(reason.contains("before round 0's first SYNC"), "{reason}");
        }
        other => panic!("the destination answered early page data with {other:?}"),
    }
}

/// CR0 with paging enabled but protected mode off, which no x86 CPU allows.
const CR0_PAGING: u64 = 1 << 31;

/// What a new destination answers `script`, played after a real source's configuration;
/// `None` where the tests on KVM are skipped.
fn answers_to(script: Vec<Message>) -> Option<Vec<Message>> {
    let _lock = kvm_turn()?;
    let dir = scratch();
    let runtime = common::runtime();
    let config = real_config(dir.path(), &runtime);
    Some(play(dir.path(), &runtime, config, script))
}

/// Plays `config` and then `state` to a new destination, as a source would at its switchover,
/// and a COMMIT if the destination says READY. Returns the destination's answers to the state
/// and the commit, once it has exited without running the guest.
fn play_state(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    config: Box<VmDescription>,
    state: Vec<Section>,
) -> Vec<Message> {
    play(dir, runtime, config, vec![Message::State(state)])
}

/// Plays `config` and then each of `script` to a new destination, reading an answer to each
/// until one is ERROR, and a COMMIT if the destination says READY last. Returns those answers,
/// once the destination has exited without running the guest.
fn play(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    config: Box<VmDescription>,
    script: Vec<Message>,
) -> Vec<Message> {
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let qmp = dir.join(format!("played-{port}.qmp"));
    let args = ["-m", MEM_MIB, "-incoming", &uri];
    let mut destination = common::start("played", &args, Some(&qmp));
    let address = uri.trim_start_matches("tcp:").to_owned();
    let answers = runtime.block_on(async {
        let mut control = tokio::net::TcpStream::connect(&address).await.unwrap();
        let answer = async |control: &mut tokio::net::TcpStream, message: Message| {
            wire::write_message(control, &message).await.unwrap();
            let answer = wire::read_message(control);
            match tokio::time::timeout(Duration::from_secs(10), answer).await {
                Ok(Ok(answer)) => answer,
                other => panic!("no answer to {message:?}: {other:?}"),
            }
        };
        control.write_all(&wire::header()).await.unwrap();
        let accepted = answer(&mut control, Message::Config(config)).await;
        assert_eq!(accepted, Message::Accept);
        let mut answers = Vec::new();
        for message in script {
            let answered = answer(&mut control, message).await;
            let refused = matches!(answered, Message::Error(_));
            answers.push(answered);
            if refused {
                return answers;
            }
        }
        if answers.last() == Some(&Message::Ready) {
            let commit = Message::Commit(Commit { run: true });
            answers.push(answer(&mut control, commit).await);
        }
        answers
    });
    let status = destination.wait_exit(Duration::from_secs(10));
    let stderr = destination.stderr();
    assert!(!status.success(), "the destination exited 0: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("incoming migration completed"), "{stderr}");
    assert_eq!(destination.line_count(), 0, "the destination ran the guest");
    answers
}
