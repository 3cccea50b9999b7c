//! `chaos-vm-services echo=ADDR reply=ADDR sink=ADDR …`: the services the VM scenarios fault (`tests/guest/`),
//! in a process of their own because the agent refuses to fault ports of its own parent process (the test binary
//! starts the agent). Binds everything, prints `SERVING`, serves until its stdin closes (the test process exited
//! or dropped it).
//!
//! - `echo=ADDR`: a TCP echo server (`chaos_tests::measure::EchoServer`)
//! - `reply=ADDR`: lymph-style, the reply on a separate connection to the caller (`ReplyServer`)
//! - `sink=ADDR`: a TCP sink reading every connection to its end, then closing it (the sender's read of 0 bytes
//!   says everything arrived)

use std::{net::SocketAddr, process::ExitCode, thread};

use chaos_tests::measure::{EchoServer, ReplyServer};

fn main() -> ExitCode {
    let mut echo = Vec::new();
    let mut reply = Vec::new();
    for spec in std::env::args().skip(1) {
        let parsed = spec.split_once('=').and_then(|(kind, addr)| Some((kind, addr.parse::<SocketAddr>().ok()?)));
        let started = match parsed {
            Some(("echo", addr)) => EchoServer::start(addr).map(|s| echo.push(s)),
            Some(("reply", addr)) => ReplyServer::start(addr).map(|s| reply.push(s)),
            Some(("sink", addr)) => start_sink(addr),
            _ => {
                println!("ERROR bad service spec {spec} (echo=ADDR, reply=ADDR or sink=ADDR)");
                return ExitCode::FAILURE;
            }
        };
        if let Err(err) = started {
            println!("ERROR {spec}: {err}");
            return ExitCode::FAILURE;
        }
    }
    println!("SERVING");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    ExitCode::SUCCESS
}

/// A TCP sink on `addr`; runs until the process exits.
fn start_sink(addr: SocketAddr) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut conn = conn;
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            });
        }
    });
    Ok(())
}
