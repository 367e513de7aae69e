//! From the file as written to the validated [`Config`]: every check, each error naming the
//! file, the line and the key.

use super::*;

pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a str,
    pub(crate) text: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, span: std::ops::Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let line =
            if span.is_empty() && span.start == 0 { 0 } else { self.text[..span.start.min(self.text.len())].matches('\n').count() + 1 };
        ConfigError { file: self.file.into(), line, key: key.into(), message: message.into() }
    }
}

/// `"tcp"` (also when not given) or `"rdma"`, for a listener's transport or a mirror's link.
fn transport(ctx: &Ctx, value: Option<&Spanned<String>>, key: &str) -> Result<Transport, ConfigError> {
    match value.map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "tcp")) => Ok(Transport::Tcp),
        Some((_, "rdma")) => Ok(Transport::Rdma),
        Some((v, other)) => Err(ctx.err(v.span(), key, format!("`{other}` is not a transport: \"tcp\" or \"rdma\""))),
    }
}

pub(crate) fn witness_config(ctx: &Ctx, w: &WitnessSection) -> Result<WitnessConfig, ConfigError> {
    let address = w
        .address
        .get_ref()
        .parse()
        .map_err(|_| ctx.err(w.address.span(), "witness.address", format!("`{}` is not an address:port", w.address.get_ref())))?;
    let secret = read_secret(ctx, "witness.", w.secret.as_ref(), w.secret_file.as_ref(), &w.address)?;
    Ok(WitnessConfig { address, secret })
}

/// A shared secret given inline or in a file; at least 16 bytes. `prefix` is the keys' section
/// ("witness.", "bdev.", or "" at the top level); `anchor` places the error when neither is given.
pub(crate) fn read_secret(
    ctx: &Ctx,
    prefix: &str,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<PathBuf>>,
    anchor: &Spanned<String>,
) -> Result<Vec<u8>, ConfigError> {
    read_optional_secret(ctx, prefix, inline, file)?
        .ok_or_else(|| ctx.err(anchor.span(), &format!("{prefix}secret"), "give exactly one of `secret` and `secret_file`"))
}

/// As [`read_secret`], where giving neither key is allowed (`None`).
pub(crate) fn read_optional_secret(
    ctx: &Ctx,
    prefix: &str,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<PathBuf>>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let (secret, span, key) = match (inline, file) {
        (None, None) => return Ok(None),
        (Some(s), None) => (s.get_ref().as_bytes().to_vec(), s.span(), "secret"),
        (None, Some(f)) => {
            let key = format!("{prefix}secret_file");
            let path = f.get_ref();
            let meta = std::fs::metadata(path).map_err(|e| ctx.err(f.span(), &key, format!("cannot read {}: {e}", path.display())))?;
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            if mode & 0o077 != 0 {
                return Err(ctx.err(
                    f.span(),
                    &key,
                    format!("{} is readable by group or others (mode {:o}): chmod 600 it", path.display(), mode & 0o777),
                ));
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| ctx.err(f.span(), &key, format!("cannot read {}: {e}", path.display())))?;
            (text.trim().as_bytes().to_vec(), f.span(), "secret_file")
        }
        (Some(s), Some(_)) => return Err(ctx.err(s.span(), &format!("{prefix}secret"), "give exactly one of `secret` and `secret_file`")),
    };
    if secret.len() < 16 {
        return Err(ctx.err(span, &format!("{prefix}{key}"), "the shared secret needs at least 16 characters"));
    }
    Ok(Some(secret))
}

/// The directory `p` is created in ("." for a bare name).
pub(crate) fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file opened for writing and created when absent (unless `creatable` says why not).
pub(crate) fn check_file(ctx: &Ctx, p: &Spanned<PathBuf>, key: &str, creatable: Result<(), &str>) -> Option<ConfigError> {
    let path = p.get_ref();
    let problem = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Some(format!("{} is a directory", path.display())),
        Ok(_) => nvmetro_ffi::check_writable(path).err().map(|e| format!("{} is not writable: {e}", path.display())),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            if let Some(e) = check_parent(ctx, p, key) {
                return Some(e);
            }
            creatable.err().map(|why| format!("{} does not exist and {why}", path.display()))
        }
        Err(e) => Some(format!("{}: {e}", path.display())),
    };
    problem.map(|m| ctx.err(p.span(), key, m))
}

/// A path created (or replaced) in its directory: that directory must exist and be writable.
pub(crate) fn check_parent(ctx: &Ctx, p: &Spanned<PathBuf>, key: &str) -> Option<ConfigError> {
    let path = p.get_ref();
    let dir = parent_of(path);
    let problem = match std::fs::metadata(&dir) {
        Ok(m) if !m.is_dir() => Some(format!("cannot create {}: {} is not a directory", path.display(), dir.display())),
        Ok(_) => nvmetro_ffi::check_writable(&dir)
            .err()
            .map(|e| format!("cannot create {}: its directory {} is not writable ({e})", path.display(), dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("cannot create {}: its directory {} does not exist", path.display(), dir.display()))
        }
        Err(e) => Some(format!("cannot create {}: {}: {e}", path.display(), dir.display())),
    };
    problem.map(|m| ctx.err(p.span(), key, m))
}

pub(crate) fn toml_error(e: &toml::de::Error, text: &str, file: &str) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let msg = e.message().to_string();
    let field = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
    let (section, line_key) = key_at(text, span.start);
    let key = match (field.or(line_key.as_deref()), section.is_empty()) {
        (Some(k), true) => k.to_string(),
        (Some(k), false) => format!("{section}.{k}"),
        (None, false) => section,
        (None, true) => "(top level)".to_string(),
    };
    ConfigError { file: file.into(), line, key, message: msg }
}

/// Whether `name` (what stands between a header's brackets) is a table name.
pub(crate) fn table_name(header: &str) -> Option<&str> {
    let name = header.trim().trim_start_matches('[').split(']').next()?.trim();
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    ok.then_some(name)
}

/// The table (`bdev`, `subsystem.namespace`, "" at the top) and the key written on the line of
/// byte `pos` of `text`, found from the text itself (for errors the TOML parser reports with a
/// position only).
pub(crate) fn key_at(text: &str, pos: usize) -> (String, Option<String>) {
    let pos = pos.min(text.len());
    let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    let mut section = String::new();
    let mut here = "";
    for l in text[..line_end].lines() {
        let t = l.trim();
        if t.starts_with('[') {
            if let Some(name) = table_name(t) {
                section = name.replace(['"', '\'', ' '], "");
            }
        }
        here = t;
    }
    let line_key = if here.starts_with('[') || here.starts_with('#') {
        None
    } else {
        here.split_once('=').map(|(k, _)| k.trim().replace(['"', '\''], "")).filter(|k| !k.is_empty())
    };
    (section, line_key)
}

pub(crate) fn hex<const N: usize>(ctx: &Ctx, s: &Spanned<String>, key: &str) -> Result<[u8; N], ConfigError> {
    let clean: String = s.get_ref().chars().filter(|c| *c != '-' && *c != ':').collect();
    if clean.len() != N * 2 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ctx.err(s.span(), key, format!("`{}` is not {} hex digits", s.get_ref(), N * 2)));
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&clean[i * 2..i * 2 + 2], 16).expect("checked hex");
    }
    Ok(out)
}

/// A stable identifier derived from the subsystem NQN and NSID (FNV-1a), so that both sites of a
/// metro derive the same NGUID for the same namespace without configuring one.
pub(crate) fn derived_id(nqn: &str, nsid: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (half, seed) in [(0usize, 0xcbf2_9ce4_8422_2325u64), (8, 0x6c62_272e_07bb_0142)] {
        let mut h = seed;
        for b in nqn.bytes().chain(nsid.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        out[half..half + 8].copy_from_slice(&h.to_be_bytes());
    }
    out
}

pub(crate) fn valid_nqn(s: &str) -> bool {
    s.len() <= 223 && s.starts_with("nqn.") && s.len() > 4 && s.is_ascii() && !s.contains(char::is_whitespace)
}

pub(crate) fn mirror_config(ctx: &Ctx, b: &BdevSection) -> Result<MirrorConfig, ConfigError> {
    let name = b.name.get_ref();
    let need = |key: &str| ctx.err(b.name.span(), &format!("bdev.{key}"), format!("mirror `{name}` needs `{key}`"));
    let local = b.local.as_ref().ok_or_else(|| need("local"))?.get_ref().clone();
    let role = b.role.as_ref().ok_or_else(|| need("role"))?;
    let preferred = match role.get_ref().as_str() {
        "preferred" => true,
        "secondary" => false,
        other => return Err(ctx.err(role.span(), "bdev.role", format!("`{other}` is not \"preferred\" or \"secondary\""))),
    };
    let addr = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<SocketAddr>, ConfigError> {
        v.as_ref()
            .map(|a| {
                a.get_ref()
                    .parse()
                    .map_err(|_| ctx.err(a.span(), &format!("bdev.{key}"), format!("`{}` is not an address:port", a.get_ref())))
            })
            .transpose()
    };
    let listen = addr(&b.listen, "listen")?;
    let peer = addr(&b.peer, "peer")?;
    if preferred && listen.is_none() {
        return Err(need("listen"));
    }
    if !preferred && peer.is_none() {
        return Err(need("peer"));
    }
    let link = transport(ctx, b.link.as_ref(), "bdev.link")?;
    let lanes = match &b.lanes {
        None => 1,
        Some(n) if (1..=16).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => return Err(ctx.err(n.span(), "bdev.lanes", format!("{} lanes: from 1 to 16", n.get_ref()))),
    };
    let metadata = b.metadata.as_ref().ok_or_else(|| need("metadata"))?.get_ref().clone();
    let region = b.region_size.as_ref().map_or(1 << 20, |r| r.get_ref().bytes());
    if !region.is_power_of_two() || !(65536..=(64 << 20)).contains(&region) {
        let span = b.region_size.as_ref().map_or(b.name.span(), Spanned::span);
        return Err(ctx.err(span, "bdev.region_size", "must be a power of two from 64KiB to 64MiB"));
    }
    let link_delay_us = match &b.link_delay {
        None => 0,
        Some(d) => parse_micros(d.get_ref()).ok_or_else(|| {
            ctx.err(d.span(), "bdev.link_delay", format!("`{}` is not a duration such as \"75us\" or \"1ms\"", d.get_ref()))
        })?,
    };
    let resync_latency_target = match &b.resync_latency_target {
        None => ResyncLatencyTarget::default(),
        Some(t) => parse_latency_target(t.get_ref()).ok_or_else(|| {
            ctx.err(
                t.span(),
                "bdev.resync_latency_target",
                format!(
                    "`{}` is not a percentage from 100% to 10000% (\"150%\"), a duration from 10us to 10s (\"500us\"), or \"off\"",
                    t.get_ref()
                ),
            )
        })?,
    };
    let heartbeat_timeout_ms = match &b.heartbeat_timeout {
        None => None,
        Some(d) => match parse_micros(d.get_ref()) {
            Some(us) if (100_000..=60_000_000).contains(&us) => Some(us / 1000),
            _ => return Err(ctx.err(d.span(), "bdev.heartbeat_timeout", format!("`{}` is not a duration from 100ms to 60s", d.get_ref()))),
        },
    };
    let manual_failback = match &b.failback {
        None => false,
        Some(f) => match f.get_ref().as_str() {
            "automatic" => false,
            "manual" => true,
            other => return Err(ctx.err(f.span(), "bdev.failback", format!("`{other}` is not \"automatic\" or \"manual\""))),
        },
    };
    let secret = read_optional_secret(ctx, "bdev.", b.secret.as_ref(), b.secret_file.as_ref())?;
    let retry_interval = match &b.retry_interval {
        None => Some(DEFAULT_RETRY_INTERVAL),
        Some(d) => match parse_duration(d.get_ref()) {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => {
                return Err(ctx.err(
                    d.span(),
                    "bdev.retry_interval",
                    format!("`{}` is not a duration such as \"30s\", \"5m\" or \"1h 30m\" (\"0s\": only on request)", d.get_ref()),
                ))
            }
        },
    };
    Ok(MirrorConfig {
        secret,
        retry_interval,
        heartbeat_timeout_ms,
        manual_failback,
        link_delay_us,
        local,
        preferred,
        site: b.site.unwrap_or(if preferred { 1 } else { 2 }),
        listen,
        peer,
        link,
        lanes,
        metadata,
        resync_rate: b.resync_rate.map_or(0, Size::bytes),
        resync_latency_target,
        region_shift: region.trailing_zeros(),
    })
}

/// "150%", "500us" or "off" (see [`ResyncLatencyTarget`]).
fn parse_latency_target(s: &str) -> Option<ResyncLatencyTarget> {
    let s = s.trim();
    if s == "off" {
        return Some(ResyncLatencyTarget::Off);
    }
    if let Some(p) = s.strip_suffix('%') {
        return p.trim().parse().ok().filter(|p| (100..=10_000).contains(p)).map(ResyncLatencyTarget::Relative);
    }
    parse_micros(s).filter(|us| (10..=10_000_000).contains(us)).map(ResyncLatencyTarget::Absolute)
}

pub(crate) const ANA_STATES: [&str; 4] = ["optimized", "non-optimized", "inaccessible", "persistent-loss"];

pub(crate) fn validate(raw: RawConfig, ctx: &Ctx) -> Result<Config, ConfigError> {
    let cores = raw.target.cores.get_ref().clone();
    if cores.is_empty() {
        return Err(ctx.err(raw.target.cores.span(), "target.cores", "needs at least one core"));
    }
    let mut seen = HashSet::new();
    for c in &cores {
        if !seen.insert(c) {
            return Err(ctx.err(raw.target.cores.span(), "target.cores", format!("core {c} is listed twice")));
        }
    }
    let mut discovery = Vec::new();
    for d in &raw.target.discovery {
        discovery.push(
            d.get_ref().parse().map_err(|_| ctx.err(d.span(), "target.discovery", format!("`{}` is not an address:port", d.get_ref())))?,
        );
    }

    let mut bdevs = Vec::new();
    let mut bdev_sizes = HashMap::new();
    for b in &raw.bdevs {
        let name = b.name.get_ref();
        if name.is_empty() || bdev_sizes.contains_key(name.as_str()) {
            return Err(ctx.err(b.name.span(), "bdev.name", format!("`{name}` is empty or used twice")));
        }
        let bs = *b.block_size.get_ref();
        if bs != 512 && bs != 4096 {
            return Err(ctx.err(b.block_size.span(), "bdev.block_size", format!("{bs} is not 512 or 4096")));
        }
        let size = b.size.as_ref().map(|s| s.get_ref().bytes());
        let mirror_keys = b.local.is_some()
            || b.role.is_some()
            || b.listen.is_some()
            || b.peer.is_some()
            || b.metadata.is_some()
            || b.failback.is_some()
            || b.heartbeat_timeout.is_some()
            || b.secret.is_some()
            || b.secret_file.is_some()
            || b.lanes.is_some()
            || b.retry_interval.is_some();
        if b.kind != BdevKind::Mirror && mirror_keys {
            return Err(ctx.err(
                b.name.span(),
                "bdev",
                format!("bdev `{name}`: local/role/listen/peer/metadata/secret/retry_interval/lanes belong to mirror bdevs"),
            ));
        }
        if b.kind != BdevKind::Error && (b.base.is_some() || b.rules.is_some()) {
            return Err(ctx.err(b.name.span(), "bdev", format!("bdev `{name}`: base/rules belong to error bdevs")));
        }
        if b.kind == BdevKind::Error {
            if let Some(p) = &b.path {
                return Err(ctx.err(p.span(), "bdev.path", "an error bdev has no path: it passes commands on to its `base`"));
            }
            if let Some(s) = &b.size {
                return Err(ctx.err(s.span(), "bdev.size", "an error bdev has no size of its own: it has its `base`'s"));
            }
            if b.block_size.span() != (0..0) {
                return Err(ctx.err(b.block_size.span(), "bdev.block_size", "an error bdev has its `base`'s block size"));
            }
            let base = b
                .base
                .as_ref()
                .ok_or_else(|| ctx.err(b.name.span(), "bdev.base", format!("error bdev `{name}` needs `base` (the bdev it wraps)")))?;
            if base.get_ref() == name {
                return Err(ctx.err(base.span(), "bdev.base", format!("error bdev `{name}` cannot wrap itself")));
            }
            let rules = match &b.rules {
                None => None,
                Some(r) => {
                    nvmetro_bdev::error::parse_rules(r.get_ref()).map_err(|e| {
                        ctx.err(
                            r.span(),
                            "bdev.rules",
                            format!("{e} (rules are JSON: one rule or an array, e.g. '[{{\"op\":\"write\",\"error\":\"eio\"}}]')"),
                        )
                    })?;
                    Some(r.get_ref().clone())
                }
            };
            bdev_sizes.insert(name.as_str(), ());
            bdevs.push(BdevConfig { error: Some(ErrorConfig { base: base.get_ref().clone(), rules }), ..stacked(name, b.kind, bs) });
            continue;
        }
        if b.kind == BdevKind::Mirror {
            bdev_sizes.insert(name.as_str(), ());
            bdevs.push(BdevConfig { mirror: Some(mirror_config(ctx, b)?), ..stacked(name, b.kind, bs) });
            continue;
        }
        match (b.kind, &b.size, &b.path) {
            (BdevKind::Malloc | BdevKind::Null, None, _) => {
                return Err(ctx.err(b.name.span(), "bdev.size", format!("bdev `{name}` needs a size")))
            }
            (BdevKind::File, _, None) => return Err(ctx.err(b.name.span(), "bdev.path", format!("file bdev `{name}` needs a path"))),
            (BdevKind::Malloc | BdevKind::Null, Some(_), Some(p)) => {
                return Err(ctx.err(p.span(), "bdev.path", "only file bdevs have a path"))
            }
            _ => {}
        }
        if let (Some(bytes), Some(s)) = (size, &b.size) {
            if bytes < u64::from(bs) || bytes % u64::from(bs) != 0 {
                return Err(ctx.err(s.span(), "bdev.size", format!("{bytes} bytes is not a positive multiple of the {bs}-byte block")));
            }
        }
        bdev_sizes.insert(name.as_str(), ());
        bdevs.push(BdevConfig {
            name: name.clone(),
            kind: b.kind,
            size,
            block_size: bs,
            hugepages: b.hugepages,
            path: b.path.as_ref().map(|p| p.get_ref().clone()),
            direct: b.direct,
            mirror: None,
            error: None,
        });
    }
    // An error bdev's base must exist, and chains of bdevs built on each other end somewhere.
    for b in &raw.bdevs {
        let (Some(base), BdevKind::Error) = (&b.base, b.kind) else { continue };
        let Some(under) = bdevs.iter().find(|x| &x.name == base.get_ref()) else {
            return Err(ctx.err(base.span(), "bdev.base", format!("no bdev named `{}`", base.get_ref())));
        };
        let mut seen = HashSet::from([b.name.get_ref().as_str()]);
        let mut at = under;
        while let Some(next) = at.depends_on() {
            if !seen.insert(at.name.as_str()) {
                return Err(ctx.err(base.span(), "bdev.base", format!("bdev `{}` is built on itself (a cycle)", b.name.get_ref())));
            }
            match bdevs.iter().find(|x| x.name == next) {
                Some(x) => at = x,
                None => break, // reported at that bdev
            }
        }
    }
    // A mirror's local leg must be a persistent bdev (a file bdev, or an error bdev over one),
    // and serves only through the mirror.
    let mut legs = HashSet::new();
    for b in &raw.bdevs {
        let Some(local) = &b.local else { continue };
        let leg = bdevs.iter().find(|x| &x.name == local.get_ref());
        let persistent = |l: &BdevConfig| l.kind == BdevKind::File;
        let base_of = |l: &BdevConfig| l.error.as_ref().and_then(|e| bdevs.iter().find(|x| x.name == e.base));
        let mut beneath = None;
        match leg {
            None => return Err(ctx.err(local.span(), "bdev.local", format!("no bdev named `{}`", local.get_ref()))),
            Some(l) if persistent(l) => {}
            Some(l) if l.kind == BdevKind::Error && base_of(l).is_some_and(persistent) => beneath = base_of(l),
            Some(l) => {
                return Err(ctx.err(
                    local.span(),
                    "bdev.local",
                    format!(
                        "`{}` is {}; a mirror leg must survive a restart (use kind = \"file\", or an error bdev over a file bdev)",
                        local.get_ref(),
                        match base_of(l) {
                            Some(under) => format!("an error bdev over a {:?} bdev", under.kind),
                            None => format!("a {:?} bdev", l.kind),
                        }
                    ),
                ))
            }
        }
        for name in std::iter::once(local.get_ref()).chain(beneath.map(|x| &x.name)) {
            if !legs.insert(name.clone()) {
                return Err(ctx.err(local.span(), "bdev.local", format!("`{name}` is already the leg of another mirror")));
            }
        }
    }

    let mut subsystems = Vec::new();
    let mut nqns = HashSet::new();
    let mut used_bdevs = HashSet::new();
    for s in &raw.subsystems {
        let nqn = s.nqn.get_ref();
        if !valid_nqn(nqn) {
            return Err(ctx.err(s.nqn.span(), "subsystem.nqn", format!("`{nqn}` is not an NQN (nqn.yyyy-mm.reverse.domain:name)")));
        }
        if nqn == "nqn.2014-08.org.nvmexpress.discovery" || !nqns.insert(nqn.clone()) {
            return Err(ctx.err(s.nqn.span(), "subsystem.nqn", format!("`{nqn}` is reserved or used twice")));
        }
        for h in &s.allowed_hosts {
            if !valid_nqn(h.get_ref()) {
                return Err(ctx.err(h.span(), "subsystem.allowed_hosts", format!("`{}` is not a host NQN", h.get_ref())));
            }
        }
        if s.allowed_hosts.is_empty() && !s.allow_any_host {
            return Err(ctx.err(
                s.nqn.span(),
                "subsystem.allowed_hosts",
                format!("subsystem `{nqn}` admits no host: list allowed_hosts or set allow_any_host = true"),
            ));
        }
        let [lo, hi] = *s.cntlid_range.get_ref();
        if lo == 0 || hi > 0xffef || lo > hi {
            return Err(ctx.err(
                s.cntlid_range.span(),
                "subsystem.cntlid_range",
                format!("[{lo}, {hi}] must lie within [1, 65519], low first"),
            ));
        }
        let max_ns = *s.max_namespaces.get_ref();
        if max_ns == 0 || max_ns > 1024 {
            return Err(ctx.err(s.max_namespaces.span(), "subsystem.max_namespaces", "must be 1 to 1024"));
        }
        let mut namespaces = Vec::new();
        let mut nsids = HashSet::new();
        let mut groups = HashSet::new();
        for ns in &s.namespaces {
            let nsid = *ns.nsid.get_ref();
            if nsid == 0 || nsid > max_ns {
                return Err(ctx.err(ns.nsid.span(), "subsystem.namespace.nsid", format!("{nsid} is outside 1..={max_ns}")));
            }
            if !nsids.insert(nsid) {
                return Err(ctx.err(ns.nsid.span(), "subsystem.namespace.nsid", format!("NSID {nsid} is used twice in `{nqn}`")));
            }
            let bdev = ns.bdev.get_ref();
            if !bdev_sizes.contains_key(bdev.as_str()) {
                return Err(ctx.err(ns.bdev.span(), "subsystem.namespace.bdev", format!("no bdev named `{bdev}`")));
            }
            if legs.contains(bdev) {
                return Err(ctx.err(
                    ns.bdev.span(),
                    "subsystem.namespace.bdev",
                    format!("bdev `{bdev}` is a mirror's local leg; export the mirror instead"),
                ));
            }
            if !used_bdevs.insert(bdev.clone()) {
                return Err(ctx.err(ns.bdev.span(), "subsystem.namespace.bdev", format!("bdev `{bdev}` already backs another namespace")));
            }
            let group = *ns.ana_group.get_ref();
            if group == 0 || group > 128 {
                return Err(ctx.err(ns.ana_group.span(), "subsystem.namespace.ana_group", "must be 1 to 128"));
            }
            groups.insert(group);
            let derived = derived_id(nqn, nsid);
            let nguid = match &ns.nguid {
                Some(s) => hex::<16>(ctx, s, "subsystem.namespace.nguid")?,
                None => derived,
            };
            let eui64 = match &ns.eui64 {
                Some(s) => hex::<8>(ctx, s, "subsystem.namespace.eui64")?,
                None => derived[8..].try_into().expect("8 bytes"),
            };
            let uuid = match &ns.uuid {
                Some(s) => hex::<16>(ctx, s, "subsystem.namespace.uuid")?,
                None => [0; 16],
            };
            namespaces.push(NamespaceConfig { nsid, bdev: bdev.clone(), nguid, eui64, uuid, ana_group: group });
        }
        namespaces.sort_by_key(|n| n.nsid);
        // A subsystem without namespaces (yet) reports one empty ANA group.
        let ana_groups = groups.iter().copied().max().unwrap_or(1);
        if let Some(gap) = (1..=ana_groups).find(|g| !groups.is_empty() && !groups.contains(g)) {
            return Err(ctx.err(
                s.nqn.span(),
                "subsystem.namespace.ana_group",
                format!("ANA groups must be dense from 1; group {gap} is unused"),
            ));
        }
        subsystems.push(SubsystemConfig {
            nqn: nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allowed_hosts: s.allowed_hosts.iter().map(|h| h.get_ref().clone()).collect(),
            allow_any_host: s.allow_any_host,
            cntlid_min: lo,
            cntlid_max: hi,
            max_namespaces: max_ns,
            ana_transition_time: s.ana_transition_time,
            ana_groups,
            namespaces,
        });
    }

    if raw.listeners.is_empty() {
        return Err(ctx.err(0..0, "listener", "no [[listener]]: add one with address = \"127.0.0.1:4420\""));
    }
    let mut listeners = Vec::new();
    let mut addrs = HashSet::new();
    for l in &raw.listeners {
        let address: SocketAddr = l
            .address
            .get_ref()
            .parse()
            .map_err(|_| ctx.err(l.address.span(), "listener.address", format!("`{}` is not an address:port", l.address.get_ref())))?;
        if !addrs.insert(address) || discovery.contains(&address) {
            return Err(ctx.err(l.address.span(), "listener.address", format!("{address} is listed twice")));
        }
        let mut ana_states = BTreeMap::new();
        for (group, state) in &l.ana_states {
            let g: u32 = group
                .parse()
                .ok()
                .filter(|g| *g >= 1)
                .ok_or_else(|| ctx.err(state.span(), "listener.ana_states", format!("`{group}` is not an ANA group number")))?;
            if !ANA_STATES.contains(&state.get_ref().as_str()) {
                return Err(ctx.err(state.span(), "listener.ana_states", format!("`{}` is not one of {ANA_STATES:?}", state.get_ref())));
            }
            ana_states.insert(g, state.get_ref().clone());
        }
        let transport = transport(ctx, l.transport.as_ref(), "listener.transport")?;
        listeners.push(ListenerConfig { address, ana_states, transport });
    }

    let mut host_sites = BTreeMap::new();
    for h in &raw.hosts {
        if !valid_nqn(h.nqn.get_ref()) {
            return Err(ctx.err(h.nqn.span(), "host.nqn", format!("`{}` is not a host NQN", h.nqn.get_ref())));
        }
        if h.site == 0 || host_sites.insert(h.nqn.get_ref().clone(), h.site).is_some() {
            return Err(ctx.err(h.nqn.span(), "host", format!("host `{}` is listed twice or has site 0", h.nqn.get_ref())));
        }
    }
    if !host_sites.is_empty() && raw.target.site.is_none() {
        return Err(ctx.err(0..0, "target.site", "[[host]] sites need this target's own site: set [target] site"));
    }
    let metrics = match &raw.metrics {
        None => None,
        Some(MetricsSection { address: None }) => Some(default_metrics_address(raw.target.site)),
        Some(MetricsSection { address: Some(a) }) => Some(
            a.get_ref().parse().map_err(|_| ctx.err(a.span(), "metrics.address", format!("`{}` is not an address:port", a.get_ref())))?,
        ),
    };
    let witness = match &raw.witness {
        None => None,
        Some(w) => Some(witness_config(ctx, w)?),
    };
    let in_capsule_data_size = match &raw.target.in_capsule_data_size {
        None => DEFAULT_IN_CAPSULE_DATA_SIZE,
        Some(s) => {
            let b = s.get_ref().bytes();
            if b % 16 != 0 || b > MAX_IN_CAPSULE_DATA_SIZE as u64 {
                return Err(ctx.err(s.span(), "target.in_capsule_data_size", "must be a multiple of 16 bytes from 0 to 128KiB"));
            }
            b as usize
        }
    };
    let max_h2c_data_size = match &raw.target.max_h2c_data_size {
        None => DEFAULT_MAX_H2C_DATA_SIZE,
        Some(s) => {
            let b = s.get_ref().bytes();
            if b % 4 != 0 || !(4096..=MAX_IN_CAPSULE_DATA_SIZE as u64).contains(&b) {
                return Err(ctx.err(s.span(), "target.max_h2c_data_size", "must be a multiple of 4 bytes from 4KiB to 128KiB"));
            }
            b as u32
        }
    };
    let (dr_groups, dr_replicas) = validate_dr(ctx, &raw, &bdevs)?;
    Ok(Config {
        dr_groups,
        dr_replicas,
        in_capsule_data_size,
        max_h2c_data_size,
        rdma_zero_copy: raw.target.rdma_zero_copy.unwrap_or(true),
        witness,
        metrics,
        cores,
        poll_mode: raw.target.poll_mode,
        socket: raw.target.socket.as_ref().map(|s| s.get_ref().clone()),
        discovery,
        bdevs,
        subsystems,
        listeners,
        site: raw.target.site,
        host_sites,
    })
}

/// A bdev over another (mirror, error): its size and storage are its base's.
fn stacked(name: &str, kind: BdevKind, block_size: u32) -> BdevConfig {
    BdevConfig {
        name: name.to_string(),
        kind,
        size: None,
        block_size,
        hugepages: false,
        path: None,
        direct: false,
        mirror: None,
        error: None,
    }
}
