//! Test support for the outbox crates (not published): TLS endpoints on loopback with
//! certificates made in the test.
//!
//! - [`Pki`]: a certificate authority of the test's own, issuing server certificates (for
//!   names of your choice, valid or expired) and client certificates, written as PEM files.
//! - [`TlsProxy`]: a TLS-terminating proxy in front of a plain local service, speaking the
//!   service's own TLS negotiation: raw TLS (Redis, RabbitMQ), PostgreSQL's `SSLRequest`, and
//!   Kafka (it rewrites the advertised broker port in responses so clients come back through
//!   it). The client under test does real TLS against it: verification, host names,
//!   expiry and client certificates are all exercised.
//! - [`Server`]: a server process of the test's own that never outlives the test, and
//!   [`redis_tls`] / [`mariadb_tls`]: real Redis and MariaDB servers with TLS listeners.
//! - [`Tansu`] (a Kafka-protocol broker) and [`NatsServer`] (JetStream): real brokers of the
//!   test's own on free ports.
//! - [`PgCluster`]: a PostgreSQL cluster of the test's own (`pg_createcluster` on a free
//!   port, with settings of the test's choice such as `wal_level=logical`), restarted or
//!   crashed without disturbing the server other tests use.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A certificate authority of the test's own; its files live in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files, and in memory for a server of the test's own.
pub struct Issued {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    /// A new CA named `name`; its certificate is [`ca_path`](Self::ca_path).
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// The CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A directory for other files of the test (removed with the `Pki`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `names` (DNS names or IP addresses), written as `<stem>.pem`
    /// and `<stem>.key`. `expired` makes one that ended yesterday.
    pub fn server(&self, stem: &str, names: &[&str], expired: bool) -> Issued {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.issue(stem, params)
    }

    /// A client certificate for `name`, written as `<stem>.pem` and `<stem>.key`.
    pub fn client(&self, stem: &str, name: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(stem, params)
    }

    fn issue(&self, stem: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Issued {
            cert: cert_path,
            key: key_path,
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    /// A rustls server configuration presenting `cert`; with `client_auth`, clients must
    /// present a certificate signed by this CA.
    pub fn server_config(&self, cert: &Issued, client_auth: bool) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_auth {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()));
        Arc::new(builder.with_single_cert(cert.chain.clone(), key).unwrap())
    }
}

/// What the proxy speaks on the client side before and after the TLS handshake.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// TLS from the first byte (Redis, RabbitMQ, NATS-less brokers).
    Tls,
    /// PostgreSQL: answer the client's `SSLRequest` with `S`, then TLS.
    Postgres,
    /// Kafka: TLS, and responses that advertise the upstream broker at `127.0.0.1:<port>` are
    /// rewritten to advertise the proxy, so the client's broker connections come back here.
    Kafka {
        /// The upstream broker's advertised port.
        advertised_port: u16,
    },
}

/// A TLS-terminating proxy on 127.0.0.1 in front of a plain service; stops when dropped.
pub struct TlsProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    /// Listen on a free loopback port and relay each connection to `upstream`.
    pub async fn start(
        upstream: SocketAddr,
        protocol: Protocol,
        config: Arc<ServerConfig>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A failed handshake is the point of some tests: just close.
                    let _ = serve(client, upstream, protocol, acceptor, addr.port()).await;
                });
            }
        });
        Self { addr, task }
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    protocol: Protocol,
    acceptor: TlsAcceptor,
    own_port: u16,
) -> std::io::Result<()> {
    if let Protocol::Postgres = protocol {
        loop {
            let mut head = [0u8; 8];
            client.read_exact(&mut head).await?;
            let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            match code {
                80877103 => {
                    client.write_all(b"S").await?;
                    break;
                }
                80877104 => client.write_all(b"N").await?, // GSSENCRequest: no
                _ => return Ok(()),                        // plain startup: refuse
            }
        }
    }
    let tls = acceptor.accept(client).await?;
    let server = TcpStream::connect(upstream).await?;
    match protocol {
        Protocol::Tls | Protocol::Postgres => {
            let (mut tls, mut server) = (tls, server);
            tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
        }
        Protocol::Kafka { advertised_port } => {
            let (mut client_read, mut client_write) = tokio::io::split(tls);
            let (mut server_read, mut server_write) = server.into_split();
            let up = async {
                tokio::io::copy(&mut client_read, &mut server_write).await?;
                server_write.shutdown().await
            };
            let down = async {
                let mut from = b"127.0.0.1".to_vec();
                from.extend_from_slice(&i32::from(advertised_port).to_be_bytes());
                let mut to = b"127.0.0.1".to_vec();
                to.extend_from_slice(&i32::from(own_port).to_be_bytes());
                loop {
                    let mut len = [0u8; 4];
                    if server_read.read_exact(&mut len).await.is_err() {
                        return client_write.shutdown().await;
                    }
                    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                    server_read.read_exact(&mut frame).await?;
                    replace_all(&mut frame, &from, &to);
                    client_write.write_all(&len).await?;
                    client_write.write_all(&frame).await?;
                }
            };
            tokio::try_join!(up, down)?;
        }
    }
    Ok(())
}

/// Replace every occurrence of `from` in `buf` by `to` (same length).
fn replace_all(buf: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut i = 0;
    while i + from.len() <= buf.len() {
        if &buf[i..i + from.len()] == from {
            buf[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
}

/// A plain TCP proxy on loopback that can black-hole connections: a held connection stays
/// open but forwards nothing either way, as after a network partition or a NAT that lost
/// its flow (no RST, no FIN: a half-open connection its client can notice only by its own
/// timeouts). [`blackhole`](Self::blackhole) holds every connection, old and new;
/// [`blackhole_existing`](Self::blackhole_existing) holds those open now while new ones work.
pub struct BlackholeProxy {
    /// The port clients connect to.
    pub port: u16,
    all: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackholeProxy {
    /// Forward 127.0.0.1:`port` (a free one) to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> =
            Default::default();
        let (a, o) = (all.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let this = Arc::new(std::sync::atomic::AtomicBool::new(false));
                o.lock().unwrap().push(this.clone());
                let a = a.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(Self::pump(cr, sw, a.clone(), this.clone()));
                    tokio::spawn(Self::pump(sr, cw, a, this));
                });
            }
        });
        Self {
            port,
            all,
            open,
            task,
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        all: Arc<std::sync::atomic::AtomicBool>,
        this: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while all.load(SeqCst) || this.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Stop forwarding on every connection, old and new (true), or forward again (false;
    /// connections held by [`blackhole_existing`](Self::blackhole_existing) stay held).
    pub fn blackhole(&self, on: bool) {
        self.all.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Hold every connection open now, for good; connections made later work.
    pub fn blackhole_existing(&self) {
        for c in self.open.lock().unwrap().iter() {
            c.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process of the test's own. It runs under a small shell that stops it when the
/// test process's end of a pipe closes: when the `Server` is dropped, and also when the test
/// process dies, so no server outlives its test.
pub struct Server {
    child: Child,
    program: String,
    args: Vec<String>,
}

impl Server {
    /// Start `program` with `args`; its output goes to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" </dev/null & pid=$!; read sig; kill -"${sig:-TERM}" $pid 2>/dev/null; wait $pid"#)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Self {
            child,
            program: program.to_owned(),
            args: args.to_vec(),
        }
    }

    /// Stop the server and wait for it.
    pub fn stop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }

    /// Kill the server with SIGKILL (no shutdown of its own) and wait for it.
    pub fn kill(&mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"KILL\n");
        }
        let _ = self.child.wait();
    }

    /// Stop it and start it again with the same arguments (a restart under a running client).
    pub fn restart(&mut self, log: &Path) {
        self.stop();
        *self = Self::spawn(&self.program.clone(), &self.args.clone(), log);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real `redis-server` with only a TLS listener on a free port, presenting `cert`; with
/// `client_auth`, clients must present a certificate signed by `pki`'s CA.
pub struct RedisTls {
    /// The TLS port.
    pub port: u16,
    /// The process.
    pub server: Server,
    log: PathBuf,
}

impl RedisTls {
    /// Start one.
    pub fn start(pki: &Pki, cert: &Issued, client_auth: bool) -> Self {
        Self::start_with(pki, cert, client_auth, &[])
    }

    /// Start one with more `redis-server` arguments (`--requirepass`, ...).
    pub fn start_with(pki: &Pki, cert: &Issued, client_auth: bool, extra: &[&str]) -> Self {
        let port = free_port();
        let log = pki.dir().join(format!("redis-{port}.log"));
        let s = |p: &Path| p.display().to_string();
        let args: Vec<String> = [
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            s(&cert.cert),
            "--tls-key-file".into(),
            s(&cert.key),
            "--tls-ca-cert-file".into(),
            s(&pki.ca_path()),
            "--tls-auth-clients".into(),
            if client_auth { "yes" } else { "no" }.into(),
            "--dir".into(),
            s(pki.dir()),
        ])
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
        let server = Server::spawn("redis-server", &args, &log);
        wait_for_port(port, Duration::from_secs(20));
        Self { port, server, log }
    }

    /// Kill and start it again on the same port; returns once it listens.
    pub fn restart(&mut self) {
        self.server.restart(&self.log);
        wait_for_port(self.port, Duration::from_secs(20));
    }
}

/// A real MariaDB server of the test's own (root without a password, database `test`), on a
/// port of its choosing; it can be restarted under running clients.
pub struct MariaDb {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    server: Server,
    dir: tempfile::TempDir,
}

impl MariaDb {
    /// Create a data directory and start the server on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port(), &[])
    }

    /// The same on `port`, with more `mariadbd` arguments (TLS files, ...).
    pub fn start_on(port: u16, extra: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Temporary files in a folder of this server's own: servers sharing /tmp (several
        // tests installing at once) name their temporary tables alike and remove each
        // other's ("Unknown table 'mysql.tmp_user_sys'": 6 of 32 concurrent installs failed).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=normal",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .output()
            .expect("mariadb-install-db (scripts/setup.sh installs mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(data.join("test")).unwrap();
        let d = |p: &Path| p.display().to_string();
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", d(&data)),
            format!("--tmpdir={}", d(&tmp)),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--socket={}", d(&dir.path().join("sock"))),
            format!("--pid-file={}", d(&dir.path().join("pid"))),
            "--user=root".into(),
            "--skip-log-bin".into(),
            "--innodb-buffer-pool-size=32M".into(),
        ];
        args.extend(extra.iter().cloned());
        let mariadbd = ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mariadbd");
        let server = Server::spawn(mariadbd, &args, &dir.path().join("log"));
        wait_for_port(port, Duration::from_secs(60));
        Self { port, server, dir }
    }

    /// `mysql://root@127.0.0.1:PORT/test`.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Stop the server and start it again on the same data and port.
    pub fn restart(&mut self) {
        let log = self.dir.path().join("log-restarted");
        self.server.restart(&log);
        wait_for_port(self.port, Duration::from_secs(60));
    }
}

/// A real MariaDB server with TLS (`cert`, clients verified against `ca` when they present a
/// certificate), on a free port.
pub struct MariaDbTls {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    _server: MariaDb,
}

impl MariaDbTls {
    /// Create the data directory and start the server.
    pub fn start(cert: &Issued, ca: &Path) -> Self {
        let d = |p: &Path| p.display().to_string();
        let server = MariaDb::start_on(
            free_port(),
            &[
                format!("--ssl-cert={}", d(&cert.cert)),
                format!("--ssl-key={}", d(&cert.key)),
                format!("--ssl-ca={}", d(ca)),
            ],
        );
        Self {
            port: server.port,
            _server: server,
        }
    }
}

/// Where the `tansu` broker binary is: `$OUTBOX_TANSU`, else `tansu` on `PATH`, else
/// `~/.cargo/bin/tansu` (where `scripts/setup.sh` installs it).
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOX_TANSU") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")))
        .filter(|p| p.is_file())
        .expect("the tansu Kafka broker is not installed: run scripts/setup.sh")
}

/// A real Kafka-protocol broker of the test's own: [tansu](https://tansu.io), one node,
/// in-memory storage, on a free port. It listens on `listen_port` and advertises
/// `advertised_port` in its metadata, so a proxy (a [`BlackholeProxy`]) can sit in between
/// and every client connection, bootstrap and partition leader alike, goes through it.
pub struct Tansu {
    /// The port the broker listens on.
    pub listen_port: u16,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// Start a broker that advertises its own port.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_advertising(port, port)
    }

    /// Start a broker listening on `listen_port` that tells clients to connect to
    /// `advertised_port` (both on 127.0.0.1).
    pub fn start_advertising(listen_port: u16, advertised_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = vec![
            "broker".into(),
            "--listener-url".into(),
            format!("tcp://127.0.0.1:{listen_port}"),
            "--advertised-listener-url".into(),
            format!("tcp://127.0.0.1:{advertised_port}"),
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ];
        let server = Server::spawn(
            &tansu_binary().display().to_string(),
            &args,
            &dir.path().join("tansu.log"),
        );
        wait_for_port(listen_port, Duration::from_secs(30));
        Self {
            listen_port,
            _server: server,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT` of the listener.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.listen_port)
    }

    /// The broker's own output so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("tansu.log")).unwrap_or_default()
    }
}

/// A real `nats-server` of the test's own with JetStream on, a store directory kept across
/// [`restart`](Self::restart)s, on a free port.
pub struct NatsServer {
    /// The client port on 127.0.0.1.
    pub port: u16,
    server: Server,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Start one and wait until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start one with more arguments (`--user`, `--pass`, `--auth`, ...).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().join("js").display().to_string(),
        ]
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
        let server = Server::spawn(bin, &args, &dir.path().join("nats.log"));
        wait_for_port(port, Duration::from_secs(20));
        Self { port, server, dir }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stop the server (its JetStream store stays).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Kill the server with SIGKILL (its JetStream store stays).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Stop it and start it again on the same port and store; returns once it listens.
    pub fn restart(&mut self) {
        let log = self.dir.path().join("nats-restarted.log");
        self.server.restart(&log);
        wait_for_port(self.port, Duration::from_secs(20));
    }
}

/// A PostgreSQL cluster for one test alone (trust auth on loopback, `fsync=off`), on a free
/// port, dropped with the value. `settings` are extra `name=value` server settings.
pub struct PgCluster {
    version: String,
    name: String,
    port: u16,
}

impl PgCluster {
    /// Create and start it (`pg_createcluster`).
    pub fn create(settings: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("PostgreSQL cluster config in /etc/postgresql")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
            .unwrap();
        let port = free_port();
        // Unique per test: the tests of one binary run at once, in one process.
        let name = format!(
            "outbox_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            port
        );
        let cluster = Self {
            version,
            name,
            port,
        };
        let port = port.to_string();
        let mut args = vec!["--start", "-p", &port, "-o", "fsync=off"];
        for s in settings {
            args.extend(["-o", s]);
        }
        args.extend([
            cluster.version.as_str(),
            cluster.name.as_str(),
            "--",
            "--auth=trust",
        ]);
        cluster.ctl("pg_createcluster", &args);
        cluster
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A clean restart.
    pub fn restart(&self) {
        self.ctl(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &self.version,
                &self.name,
                "restart",
            ],
        );
    }

    /// Kill the server (`-m immediate`) and leave it down until [`start`](Self::start).
    pub fn kill(&self) {
        self.ctl(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                "-m",
                "immediate",
                &self.version,
                &self.name,
                "stop",
            ],
        );
    }

    /// Start the server again after [`kill`](Self::kill).
    pub fn start(&self) {
        self.ctl(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &self.version,
                &self.name,
                "start",
            ],
        );
    }

    /// Kill the server (`-m immediate`: no checkpoint, no flush of what sits in its WAL
    /// buffers) and start it again: it recovers from its WAL as after a power cut, losing
    /// what was committed without waiting for a flush.
    pub fn crash_and_start(&self) {
        self.kill();
        self.start();
    }

    fn ctl(&self, program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::replace_all;

    #[test]
    fn replaces_every_occurrence() {
        let mut b = b"xx127.0.0.1\x00\x00\x23\x28yy127.0.0.1\x00\x00\x23\x28".to_vec();
        let mut from = b"127.0.0.1".to_vec();
        from.extend_from_slice(&9000i32.to_be_bytes());
        let mut to = b"127.0.0.1".to_vec();
        to.extend_from_slice(&9001i32.to_be_bytes());
        replace_all(&mut b, &from, &to);
        assert_eq!(b.windows(to.len()).filter(|w| *w == &to[..]).count(), 2);
    }
}
