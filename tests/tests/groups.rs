//! Groups, uids, broadcast and publish across worker processes.

use wm_e2e::*;

fn server(count: u32) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "g",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        count,
        "",
    ));
    s.start();
    (s, port)
}

#[test]
fn group_messages_reach_members_in_every_worker() {
    let (s, port) = server(4);
    let mut clients: Vec<TextClient> = one_client_per_worker(port, 4).into_values().collect();
    let pids: Vec<u32> = s.worker_pids("g").iter().map(|p| p.1).collect();
    assert_eq!(pids.len(), 4);
    for c in clients.iter_mut() {
        assert_eq!(c.call("join room"), "ok");
    }
    // Membership is replicated through the master: poll until every worker knows all four.
    for c in clients.iter_mut() {
        wait_for("membership to reach every worker", || {
            (c.call("count room") == "4").then_some(())
        });
    }
    clients[0].send("gsend room hello everyone");
    for c in clients.iter_mut() {
        assert_eq!(c.recv().unwrap(), "hello everyone");
    }
    // Excluding the sender.
    clients[1].send("gsendx room not for me");
    for (i, c) in clients.iter_mut().enumerate() {
        if i != 1 {
            assert_eq!(c.recv().unwrap(), "not for me");
        }
    }
    assert_eq!(
        clients[1].call("echo check"),
        "echo check",
        "the sender got nothing extra"
    );
    // Leaving stops delivery.
    assert_eq!(clients[3].call("leave room"), "ok");
    wait_for("the leave to spread", || {
        (clients[0].call("count room") == "3").then_some(())
    });
    clients[0].send("gsend room after leave");
    for c in clients.iter_mut().take(3) {
        assert_eq!(c.recv().unwrap(), "after leave");
    }
    assert_eq!(clients[3].call("ping"), "ping", "the leaver got nothing");
}

#[test]
fn order_holds_for_a_thousand_messages_across_workers() {
    let (_s, port) = server(2);
    let mut pair: Vec<TextClient> = one_client_per_worker(port, 2).into_values().collect();
    let mut receiver = pair.pop().unwrap();
    let mut sender = pair.pop().unwrap();
    assert_eq!(receiver.call("join seq"), "ok");
    wait_for("the receiver's join to reach the sender's worker", || {
        (sender.call("count seq") == "1").then_some(())
    });
    for i in 0..1000 {
        sender.send(&format!("gsend seq {i}"));
    }
    for i in 0..1000 {
        assert_eq!(receiver.recv().unwrap(), i.to_string());
    }
}

#[test]
fn uids_and_broadcast_span_workers_and_gone_members_are_no_error() {
    let (s, port) = server(2);
    let mut pair: Vec<TextClient> = one_client_per_worker(port, 2).into_values().collect();
    let mut bob = pair.pop().unwrap();
    let mut ann = pair.pop().unwrap();
    assert_eq!(bob.call("uid bob"), "ok");
    assert_eq!(bob.call("join team"), "ok");
    assert_eq!(ann.call("uid ann"), "ok");
    assert_eq!(ann.call("join team"), "ok");
    wait_for("both uids everywhere", || {
        (ann.call("uids team") == "ann,bob").then_some(())
    });
    ann.send("touid bob psst");
    assert_eq!(bob.recv().unwrap(), "psst");
    ann.send("all to everyone");
    assert_eq!(ann.recv().unwrap(), "to everyone");
    assert_eq!(bob.recv().unwrap(), "to everyone");
    // Bob leaves; sending to him or his group is not an error for anyone.
    bob.shutdown();
    wait_for("bob's departure to spread", || {
        (ann.call("uids team") == "ann").then_some(())
    });
    ann.send("touid bob anyone there?");
    ann.send("gsend team still here");
    assert_eq!(ann.recv().unwrap(), "still here");
    assert!(!s.log().contains("panicked"));
}

#[test]
fn a_dead_workers_members_leave_its_groups() {
    let (s, port) = server(2);
    let mut by_pid = one_client_per_worker(port, 2);
    let pids: Vec<u32> = by_pid.keys().copied().collect();
    let mut victim_client = by_pid.remove(&pids[1]).unwrap();
    let mut survivor = by_pid.remove(&pids[0]).unwrap();
    assert_eq!(victim_client.call("join g"), "ok");
    assert_eq!(survivor.call("join g"), "ok");
    wait_for("both members known", || {
        (survivor.call("count g") == "2").then_some(())
    });
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    assert!(victim_client.closed_by_server());
    wait_for("the dead worker's member to be dropped", || {
        (survivor.call("count g") == "1").then_some(())
    });
    // Its replacement learns the current membership when it starts.
    wait_for("a replacement worker", || {
        let p = s.worker_pids("g");
        (p.len() == 2 && !p.iter().any(|x| x.1 == pids[1])).then_some(())
    });
    let mut newcomer = one_client_per_worker(port, 2)
        .into_values()
        .find(|_| true)
        .unwrap();
    wait_for("the newcomer's worker to know the group", || {
        (newcomer.call("count g") == "1").then_some(())
    });
}

#[test]
fn publish_reaches_on_publish_in_every_worker() {
    let (_s, port) = server(3);
    let mut clients: Vec<TextClient> = one_client_per_worker(port, 3).into_values().collect();
    for c in clients.iter_mut() {
        assert_eq!(c.call("sub"), "ok");
    }
    clients[2].send("publish news hot off the press");
    for c in clients.iter_mut() {
        assert_eq!(c.recv().unwrap(), "published news hot off the press");
    }
}
