//! `hubmesh user …` and user tokens with real `hubmesh` processes: accounts
//! added with the password on stdin while the hub is stopped (directly on
//! its store) and while it runs (through its operator API); login at hub 1,
//! `/users/me` at hub 2 with that token (roaming); logout at hub 1 refused at
//! hub 2 within a deadline; a token from another federation's hub refused;
//! `passwd`, `remove`, `list`, and bad input to the CLI. Every wait has a
//! deadline.

mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{HubOptions, HubProc, WAIT, client, hubmesh, poll, run_with_stdin, tmp};
use serde_json::Value;

/// A hub of `federation`, with no operator token from the environment.
fn hub(federation: &str) -> HubOptions {
    HubOptions::new(federation).env_remove("HUBMESH_ADMIN_TOKEN")
}

/// Runs `hubmesh user ARGS --data-dir DIR` with `stdin` piped in.
fn user(dir: &Path, args: &[&str], stdin: &str) -> Result<Output> {
    let mut cmd = hubmesh(["user"]);
    cmd.args(args).arg("--data-dir").arg(dir);
    run_with_stdin(&mut cmd, stdin.as_bytes(), WAIT)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "unexpected success");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn login(hub: &HubProc, user: &str, pw: &str) -> Result<(u16, Value)> {
    let r = client()
        .post(format!("{}/token", hub.http))
        .form(&[("username", user), ("password", pw)])
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn token(hub: &HubProc, user: &str, pw: &str) -> Result<String> {
    let (s, v) = login(hub, user, pw).await?;
    if s != 200 {
        bail!("login {user} answered {s}: {v}");
    }
    Ok(v["access_token"]
        .as_str()
        .context("access_token")?
        .to_owned())
}

async fn me(hub: &HubProc, token: &str) -> Result<(u16, Value)> {
    let r = client()
        .get(format!("{}/users/me", hub.http))
        .bearer_auth(token)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn until_me(hub: &HubProc, token: &str, want: u16) -> Result<Duration> {
    let start = Instant::now();
    poll(
        &format!("/users/me answering {want}"),
        WAIT,
        Duration::from_millis(25),
        || async {
            let (s, v) = me(hub, token).await?;
            Ok(if s == want {
                ControlFlow::Break(start.elapsed())
            } else {
                ControlFlow::Continue(format!("{s} {v}"))
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_tokens_roaming_and_logout_across_hub_processes() -> Result<()> {
    let (d1, d2, d3) = (tmp(), tmp(), tmp());

    // Stopped hub: directly on its (new) store.
    let out = user(
        d1.path(),
        &["add", "alice", "--admin"],
        "password-a\npassword-a\n",
    )?;
    assert!(ok(&out).contains("created user alice (admin)"));
    let err = failed(&user(
        d1.path(),
        &["add", "mallory"],
        "password-a\npassword-b\n",
    )?);
    assert!(err.contains("do not match"), "{err}");
    let err = failed(&user(d1.path(), &["add", "mallory"], "password-a\n")?);
    assert!(err.contains("twice"), "{err}");
    let err = failed(&user(
        d1.path(),
        &["add", "bad name"],
        "password-a\npassword-a\n",
    )?);
    assert!(err.contains("invalid username"), "{err}");
    let err = failed(&user(
        d1.path(),
        &["add", "alice"],
        "password-a\npassword-a\n",
    )?);
    assert!(err.contains("already exists"), "{err}");
    let err = failed(&user(&d1.path().join("nope"), &["list"], "")?);
    assert!(err.contains("no hub data directory"), "{err}");

    // Running hubs: through the operator API found in DATA_DIR/facade.addr.
    let h1 = hub("users-test").start(d1.path())?;
    let h2 = hub("users-test").bootstrap(&h1.mesh).start(d2.path())?;
    let h3 = hub("other-federation").start(d3.path())?;
    let out = user(d1.path(), &["add", "bob"], "password-b\npassword-b\n")?;
    assert!(ok(&out).contains("created user bob"));
    let err = failed(&user(
        d1.path(),
        &["add", "bob"],
        "password-b\npassword-b\n",
    )?);
    assert!(err.contains("409"), "{err}");
    let list = ok(&user(d1.path(), &["list"], "")?);
    let names: Vec<&str> = list.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(names, ["alice", "bob"], "{list}");
    assert!(
        list.lines()
            .next()
            .unwrap_or("")
            .contains("\tadmin\tpassword\t"),
        "{list}"
    );

    // Login at hub 1, roam to hub 2.
    let ta = token(&h1, "alice", "password-a").await?;
    let tb = token(&h1, "bob", "password-b").await?;
    until_me(&h2, &ta, 200).await?;
    let (_, v) = me(&h2, &ta).await?;
    assert_eq!(v["username"], "alice");
    assert_eq!(v["is_admin"], true);

    // Logout at hub 1: refused at hub 2 within the deadline.
    let r = client()
        .post(format!("{}/logout", h1.http))
        .bearer_auth(&ta)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let took = until_me(&h2, &ta, 401).await?;
    eprintln!("logout at hub 1 refused at hub 2 after {took:?}");
    let (_, v) = me(&h2, &ta).await?;
    assert_eq!(v["detail"], "token has been revoked");
    assert_eq!(me(&h2, &tb).await?.0, 200, "other tokens unaffected");

    // Another federation's hub: its token is refused here.
    let out = user(d3.path(), &["add", "carol"], "password-c\npassword-c\n")?;
    ok(&out);
    let tc = token(&h3, "carol", "password-c").await?;
    assert_eq!(me(&h3, &tc).await?.0, 200);
    let (s, v) = me(&h1, &tc).await?;
    assert_eq!(s, 401);
    assert!(
        v["detail"].as_str().unwrap_or("").contains("not a member"),
        "{v}"
    );

    // passwd and remove while running.
    ok(&user(
        d1.path(),
        &["passwd", "alice"],
        "password-a2\npassword-a2\n",
    )?);
    assert_eq!(login(&h1, "alice", "password-a").await?.0, 401);
    token(&h1, "alice", "password-a2").await?;
    ok(&user(d1.path(), &["remove", "bob"], "")?);
    assert_eq!(
        me(&h1, &tb).await?.0,
        401,
        "removed account's token refused at home"
    );
    assert_eq!(login(&h1, "bob", "password-b").await?.0, 401);
    let err = failed(&user(d1.path(), &["remove", "bob"], "")?);
    assert!(err.contains("404"), "{err}");

    // Hub 1 killed (stale facade.addr): the CLI falls back to the store.
    drop(h1);
    let list = ok(&user(d1.path(), &["list"], "")?);
    assert_eq!(list.lines().count(), 1, "{list}");
    ok(&user(
        d1.path(),
        &["passwd", "alice"],
        "password-a3\npassword-a3\n",
    )?);
    let err = failed(&user(
        d1.path(),
        &["passwd", "nobody"],
        "password-x\npassword-x\n",
    )?);
    assert!(err.contains("no such user"), "{err}");
    let h1 = hub("users-test").start(d1.path())?;
    token(&h1, "alice", "password-a3").await?;
    drop((h1, h2, h3));
    Ok(())
}
