use super::*;
use crate::tasks::model::Outcome;
use crate::tasks::store::memory::MemoryStore;

fn engine(page: usize) -> Arc<TaskEngine> {
    let config = TasksConfig { list_page_size: page, ..TasksConfig::default() };
    TaskEngine::new(config, Arc::new(MemoryStore::new()))
}

#[tokio::test]
async fn several_waiters_all_get_the_result() {
    let e = engine(10);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (e, id) = (e.clone(), t.id.clone());
            tokio::spawn(async move { e.wait_terminal("me", &id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
    e.finish(&t.id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await;
    for w in waiters {
        let r = w.await.unwrap().unwrap();
        assert_eq!(r.status, TaskStatus::Completed);
    }
}

#[tokio::test]
async fn a_waiter_is_woken_even_when_another_one_sees_the_end_first() {
    // The window between a transition storing its terminal status and waking the waiters: a
    // second waiter arriving there sees the end at once. The first must still be woken.
    let e = engine(10);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let first = {
        let (e, id) = (e.clone(), t.id.clone());
        tokio::spawn(async move { e.wait_terminal("me", &id).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // What `transition` does first: store the terminal status…
    e.store
        .update(&t.id, &|r| {
            r.status = TaskStatus::Completed;
            true
        })
        .await
        .unwrap();
    // …a second waiter comes now…
    let second = e.wait_terminal("me", &t.id).await.expect("the task");
    assert_eq!(second.status, TaskStatus::Completed);
    // …and then the wake.
    e.wake(&t.id, true);
    let first = tokio::time::timeout(Duration::from_secs(2), first).await;
    assert!(first.is_ok(), "the first waiter was never woken");
}

#[tokio::test]
async fn cancel_is_refused_for_terminal_tasks_and_strangers() {
    let e = engine(10);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(5000)).await.unwrap();
    let stop = e.stop_signal(&t.id).await;
    assert_eq!(e.cancel("someone else", &t.id).await.unwrap_err(), CancelError::NotFound);
    let c = e.cancel("me", &t.id).await.unwrap();
    assert_eq!(c.status, TaskStatus::Cancelled);
    assert!(stop.await.is_ok(), "the runner is told to stop");
    assert_eq!(e.cancel("me", &t.id).await.unwrap_err(), CancelError::Terminal("cancelled"));
    // Work that completes after the cancel does not change the status.
    assert!(e.finish(&t.id, TaskStatus::Completed, None, None).await.is_none());
}

#[tokio::test]
async fn ttl_is_capped_and_expiry_deletes() {
    let e = engine(10);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(u64::MAX)).await.unwrap();
    assert_eq!(t.ttl_ms, TasksConfig::default().max_ttl_ms);
    let short = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(1)).await.unwrap();
    let stop = e.stop_signal(&short.id).await;
    let waiter = {
        let (e, id) = (e.clone(), short.id.clone());
        tokio::spawn(async move { e.wait_terminal("me", &id).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Asked 1 ms, it gets the floor; the sweep at the end of that deletes it.
    assert_eq!(e.sweep(SystemTime::now() + Duration::from_millis(MIN_TTL_MS)).await, 1);
    assert!(e.get("me", &short.id).await.is_none());
    assert!(stop.await.is_ok(), "running work is stopped at expiry");
    assert!(waiter.await.unwrap().is_none(), "a waiter learns the task is gone");
}

#[tokio::test]
async fn a_zero_ttl_gets_a_floor_not_a_task_deleted_at_once() {
    let e = engine(10);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(0)).await.unwrap();
    assert!(t.ttl_ms >= MIN_TTL_MS, "ttl {} ms", t.ttl_ms);
    assert_eq!(e.sweep(SystemTime::now() + Duration::from_millis(100)).await, 0, "still there 100 ms later");
}

#[tokio::test]
async fn list_pages_with_opaque_cursors() {
    let e = engine(2);
    for _ in 0..5 {
        e.create("me", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
    }
    e.create("other", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
    let (p1, c1) = e.list("me", None).await.unwrap();
    let (p2, c2) = e.list("me", c1.as_deref()).await.unwrap();
    let (p3, c3) = e.list("me", c2.as_deref()).await.unwrap();
    assert_eq!((p1.len(), p2.len(), p3.len()), (2, 2, 1));
    assert!(c3.is_none());
    assert!(e.list("me", Some("garbage")).await.is_err());
}

#[tokio::test]
async fn an_upstreams_own_task_is_recorded_routed_by_owner_and_forgotten() {
    let e = engine(10);
    let task = serde_json::json!({
        "taskId": "up-1", "status": "working", "ttl": 60000, "pollInterval": 250,
        "createdAt": "2026-01-02T03:04:05.678Z",
    });
    let serde_json::Value::Object(task) = task else { unreachable!() };
    let r = e.adopt_native("me", "brew", &task, Generation::Legacy).await.unwrap().expect("recorded");
    assert_eq!((r.id.as_str(), r.origin, r.runner.as_deref()), ("up-1", Origin::Native, None));
    assert_eq!((r.ttl_ms, r.poll_interval_ms), (60000, 250));
    assert_eq!(crate::tasks::model::rfc3339(r.created_at), "2026-01-02T03:04:05.678Z");
    assert!(e.native("me", "up-1").await.is_some());
    assert!(e.native("someone else", "up-1").await.is_none());
    assert!(e.owned_by_another("someone else", "up-1").await);
    assert!(!e.owned_by_another("me", "up-1").await);
    // Nothing of it ran here: recovery leaves it alone.
    assert!(e.recover().await.unwrap().is_empty());
    assert_eq!(e.get("me", "up-1").await.unwrap().status, TaskStatus::Working);
    // A task without a ttl (unlimited upstream) is kept for the longest ttl the proxy gives.
    let serde_json::Value::Object(flat) = serde_json::json!({"taskId": "up-2", "ttlMs": null}) else {
        unreachable!()
    };
    let r = e.adopt_native("me", "brew", &flat, Generation::Modern).await.unwrap().unwrap();
    assert_eq!(r.ttl_ms, TasksConfig::default().max_ttl_ms);
    // An id of the proxy's own is never taken over by an upstream's.
    let own = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let serde_json::Value::Object(clash) = serde_json::json!({"taskId": own.id}) else { unreachable!() };
    assert!(e.adopt_native("me", "brew", &clash, Generation::Legacy).await.unwrap().is_none());
    assert_eq!(e.get("me", &own.id).await.unwrap().origin, Origin::Local);
    e.forget_native("up-1").await;
    e.forget_native(&own.id).await;
    assert!(e.get("me", "up-1").await.is_none(), "the upstream said it is gone");
    assert!(e.get("me", &own.id).await.is_some(), "only records of upstream tasks are forgotten");
}
