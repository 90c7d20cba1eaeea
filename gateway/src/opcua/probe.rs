//! `guantong-gateway probe opcua`: what an installer needs before writing a
//! config. Lists the server's endpoints with their security policies and
//! user token types, opens a session (with the same PKI and trust rules as
//! the collector), browses the address space as a tree with each
//! variable's data type and current value, and prints a `[[devices]]`
//! snippet for the chosen nodes (or every variable found), with namespaces
//! written by URI, ready to paste into the config.

use std::fmt::Write as _;
use std::path::PathBuf;

use async_opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, ByteString, NodeClass,
    NodeId, QualifiedName, ReadValueId, ReferenceTypeId, TimestampsToReturn, Variant,
};

use super::config::{NodeAddress, OpcUaConfig};
use super::{Connection, OpcUaError, build_client, describe_endpoint};
use crate::config::Problems;
use crate::value::ValueType;

#[derive(clap::Args, Debug)]
pub struct OpcUaProbe {
    /// Server discovery URL, `opc.tcp://host:port[/path]`.
    #[arg(long)]
    pub url: String,
    /// `best`, `none`, `basic256sha256`, `aes128_sha256_rsaoaep` or
    /// `aes256_sha256_rsapss`.
    #[arg(long, default_value = "best")]
    pub security_policy: String,
    /// `best`, `none`, `sign` or `sign_and_encrypt`.
    #[arg(long, default_value = "best")]
    pub security_mode: String,
    #[arg(long)]
    pub username: Option<String>,
    /// Better given in the environment than on the command line.
    #[arg(long, env = "GUANTONG_OPCUA_PASSWORD", requires = "username")]
    pub password: Option<String>,
    /// PKI directory (the gateway's certificate, trusted/ and rejected/);
    /// use the gateway's own so that a trust decision carries over.
    #[arg(long, default_value = "opcua-pki")]
    pub pki_dir: PathBuf,
    /// Trust the server's certificate if this PKI has none recorded for it.
    #[arg(long)]
    pub trust_on_first_use: bool,
    /// Only list the endpoints.
    #[arg(long)]
    pub endpoints_only: bool,
    /// Where to start browsing (default: the Objects folder).
    #[arg(long, default_value = "i=85")]
    pub browse: String,
    /// How many levels below `--browse`.
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// Nodes to put into the tag-mapping snippet (repeat); default: every
    /// variable the browse found.
    #[arg(long)]
    pub select: Vec<String>,
    /// Device id used in the snippet.
    #[arg(long, default_value = "opcua-1")]
    pub device_id: String,
}

/// One variable seen while browsing.
struct Found {
    node: String,
    name: String,
    value_type: ValueType,
}

pub async fn run(args: OpcUaProbe, out: &mut impl std::io::Write) -> Result<(), OpcUaError> {
    let config = probe_config(&args)?;
    let mut client = build_client(&config)?;
    let endpoints = client
        .get_server_endpoints_from_url(config.url.as_str())
        .await
        .map_err(|e| OpcUaError::status("GetEndpoints", e.status()))?;
    let mut text = format!("endpoints of {}\n", config.url);
    for e in &endpoints {
        let _ = writeln!(
            text,
            "  {}  {}",
            describe_endpoint(e),
            e.endpoint_url.as_ref()
        );
    }
    write_out(out, &text)?;
    if args.endpoints_only {
        return Ok(());
    }
    let conn = Connection::open(&config, &mut client).await?;
    let result = browse_and_print(&args, &conn, out).await;
    conn.close().await;
    result
}

fn write_out(out: &mut impl std::io::Write, text: &str) -> Result<(), OpcUaError> {
    out.write_all(text.as_bytes())
        .map_err(|e| OpcUaError::Setup(format!("stdout: {e}")))
}

fn probe_config(args: &OpcUaProbe) -> Result<OpcUaConfig, OpcUaError> {
    let mut t = toml::Table::new();
    t.insert("id".into(), args.device_id.clone().into());
    t.insert("url".into(), args.url.clone().into());
    t.insert(
        "security_policy".into(),
        args.security_policy.clone().into(),
    );
    t.insert("security_mode".into(), args.security_mode.clone().into());
    t.insert("trust_on_first_use".into(), args.trust_on_first_use.into());
    if let (Some(u), Some(p)) = (&args.username, &args.password) {
        t.insert("username".into(), u.clone().into());
        t.insert("password".into(), p.clone().into());
    }
    t.insert("tags".into(), toml::Value::Array(Vec::new()));
    let mut problems = Problems::default();
    let parsed = super::config::parse("probe", t, &mut problems);
    match parsed {
        Some(mut c) if problems.len() == 0 => {
            let cwd = std::env::current_dir().unwrap_or_default();
            c.pki_dir = Some(args.pki_dir.clone());
            c.resolve_paths(&cwd, &cwd);
            // The gateway's PKI: its certificate names the gateway's URI,
            // which the server checks against the one the session presents.
            c.application_uri = Some(
                super::pki::own_application_uri(c.pki_dir())
                    .unwrap_or_else(|| "urn:guantong:gateway:probe".into()),
            );
            Ok(c)
        }
        _ => Err(OpcUaError::Setup(format!(
            "probe options: {}",
            problems.messages().join("; ")
        ))),
    }
}

async fn browse_and_print(
    args: &OpcUaProbe,
    conn: &Connection,
    out: &mut impl std::io::Write,
) -> Result<(), OpcUaError> {
    let session = &conn.session;
    let namespaces = session
        .read_namespace_array()
        .await
        .map_err(|e| OpcUaError::status("read NamespaceArray", e.status()))?;
    let mut uris: Vec<(u16, String)> = namespaces
        .known_namespaces()
        .iter()
        .map(|(u, i)| (*i, u.clone()))
        .collect();
    uris.sort();
    let mut text = String::from("\nnamespaces\n");
    for (i, u) in &uris {
        let _ = writeln!(text, "  ns={i}  {u}");
    }
    write_out(out, &text)?;
    let start = NodeAddress::parse(&args.browse).map_err(OpcUaError::Setup)?;
    let start = match &start.namespace {
        super::config::Namespace::Index(i) => start.with_index(*i),
        super::config::Namespace::Uri(u) => start.with_index(
            namespaces
                .get_index(u)
                .ok_or_else(|| OpcUaError::Setup(format!("namespace {u} is not on the server")))?,
        ),
    };
    let stable = |n: &NodeId| -> String {
        let s = n.to_string();
        let id = match s.split_once(';') {
            Some((ns, rest)) if ns.starts_with("ns=") => rest.to_string(),
            _ => s.clone(),
        };
        match uris.iter().find(|(i, _)| *i == n.namespace) {
            Some((i, u)) if *i != 0 => format!("nsu={u};{id}"),
            _ => id,
        }
    };

    let mut found = Vec::new();
    let mut text = format!("\naddress space from {}\n", stable(&start));
    // Depth-first, children in server order.
    let mut stack: Vec<(NodeId, usize)> = vec![(start, 0)];
    let mut visited = std::collections::HashSet::new();
    let mut nodes_seen = 0usize;
    while let Some((node, depth)) = stack.pop() {
        if depth >= args.depth || !visited.insert(node.clone()) {
            continue;
        }
        let children = browse_children(session, &node).await?;
        let vars: Vec<NodeId> = children
            .iter()
            .filter(|c| c.2 == NodeClass::Variable)
            .map(|c| c.0.clone())
            .collect();
        let details = variable_details(session, &vars).await?;
        let mut next = Vec::new();
        for (child, name, class) in children {
            nodes_seen += 1;
            let indent = "  ".repeat(depth + 1);
            match class {
                NodeClass::Variable => {
                    let (dtype, value) = details
                        .get(&child)
                        .cloned()
                        .unwrap_or_else(|| ("?".into(), None));
                    let shown = value
                        .as_ref()
                        .map(super::convert::text)
                        .unwrap_or_else(|| "(no value)".into());
                    let _ = writeln!(
                        text,
                        "{indent}{name}  [{}]  {dtype} = {shown}",
                        stable(&child)
                    );
                    found.push(Found {
                        node: stable(&child),
                        name,
                        value_type: value.as_ref().map(value_type_of).unwrap_or_default(),
                    });
                }
                _ => {
                    let _ = writeln!(text, "{indent}{name}/  [{}]  {class:?}", stable(&child));
                    next.push((child, depth + 1));
                }
            }
        }
        stack.extend(next.into_iter().rev());
        if nodes_seen > 20_000 {
            let _ = writeln!(
                text,
                "  ... stopped after 20000 nodes; use --browse and --depth"
            );
            break;
        }
    }
    write_out(out, &text)?;

    // A `--select` is a NodeId (`ns=`, `nsu=` or bare) or a browse name;
    // one outside the browsed part is read on its own, one the server does
    // not have is named and makes the probe fail.
    let mut unknown = Vec::new();
    let mut extra = Vec::new();
    let mut chosen_at = Vec::new();
    for sel in &args.select {
        let id = NodeAddress::parse(sel)
            .ok()
            .and_then(|a| match &a.namespace {
                super::config::Namespace::Index(i) => Some(a.with_index(*i)),
                super::config::Namespace::Uri(u) => {
                    namespaces.get_index(u).map(|i| a.with_index(i))
                }
            });
        let wanted = id.as_ref().map(&stable);
        let hit = found.iter().position(|f| {
            Some(&f.node) == wanted.as_ref()
                || f.name == *sel
                || f.node.ends_with(&format!(";{sel}"))
        });
        match (hit, id) {
            (Some(i), _) => chosen_at.push(i),
            (None, Some(id)) => {
                let details = variable_details(session, std::slice::from_ref(&id)).await?;
                match details.get(&id).and_then(|(_, v)| v.clone()) {
                    Some(value) => extra.push(Found {
                        node: stable(&id),
                        name: id.identifier.to_string(),
                        value_type: value_type_of(&value),
                    }),
                    None => unknown.push(sel.clone()),
                }
            }
            (None, None) => unknown.push(sel.clone()),
        }
    }
    let chosen: Vec<&Found> = if args.select.is_empty() {
        found.iter().collect()
    } else {
        chosen_at.iter().map(|&i| &found[i]).chain(&extra).collect()
    };
    let mut snippet = format!(
        "\n# tag mapping, ready to paste into the gateway config\n[[devices]]\nid = \"{}\"\nprotocol = \"opcua\"\nurl = \"{}\"\nsecurity_policy = \"{}\"\nsecurity_mode = \"{}\"\npublishing_interval = \"1s\"\n",
        args.device_id, args.url, args.security_policy, args.security_mode
    );
    let mut names = std::collections::HashSet::new();
    for f in chosen {
        let mut name: String = f
            .name
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        while !names.insert(name.clone()) {
            name.push('_');
        }
        let _ = write!(
            snippet,
            "\n[[devices.tags]]\nname = {}\nnode = {}\ntype = \"{}\"\n",
            toml::Value::String(name),
            toml::Value::String(f.node.clone()),
            type_name(f.value_type)
        );
    }
    write_out(out, &snippet)?;
    if !unknown.is_empty() {
        return Err(OpcUaError::Setup(format!(
            "--select: no such variable on the server (or namespace unknown): {}",
            unknown.join(", ")
        )));
    }
    Ok(())
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Bool => "bool",
        ValueType::Int => "int",
        ValueType::Uint => "uint",
        ValueType::Double => "double",
        ValueType::String => "string",
    }
}

fn value_type_of(v: &Variant) -> ValueType {
    match v {
        Variant::Boolean(_) => ValueType::Bool,
        Variant::SByte(_) | Variant::Int16(_) | Variant::Int32(_) | Variant::Int64(_) => {
            ValueType::Int
        }
        Variant::Byte(_) | Variant::UInt16(_) | Variant::UInt32(_) | Variant::UInt64(_) => {
            ValueType::Uint
        }
        Variant::Float(_) | Variant::Double(_) => ValueType::Double,
        _ => ValueType::String,
    }
}

/// Hierarchical children of `node`: id, display name, class.
async fn browse_children(
    session: &async_opcua::client::Session,
    node: &NodeId,
) -> Result<Vec<(NodeId, String, NodeClass)>, OpcUaError> {
    let desc = BrowseDescription {
        node_id: node.clone(),
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
        include_subtypes: true,
        node_class_mask: 0,
        result_mask: BrowseResultMask::All as u32,
    };
    let mut out = Vec::new();
    let mut results = session
        .browse(&[desc], 1000, None)
        .await
        .map_err(|e| OpcUaError::status("Browse", e.status()))?;
    while let Some(r) = results.pop() {
        for rd in r.references.into_iter().flatten() {
            if rd.node_id.server_index != 0 {
                continue;
            }
            out.push((
                rd.node_id.node_id,
                rd.display_name.text.as_ref().to_string(),
                rd.node_class,
            ));
        }
        let cp: ByteString = r.continuation_point;
        if cp.is_null_or_empty() {
            break;
        }
        results = session
            .browse_next(false, &[cp])
            .await
            .map_err(|e| OpcUaError::status("BrowseNext", e.status()))?;
    }
    Ok(out)
}

/// Data type name and current value of each variable.
async fn variable_details(
    session: &async_opcua::client::Session,
    vars: &[NodeId],
) -> Result<std::collections::HashMap<NodeId, (String, Option<Variant>)>, OpcUaError> {
    let mut map = std::collections::HashMap::new();
    for chunk in vars.chunks(500) {
        let mut ids = Vec::new();
        for n in chunk {
            for attr in [AttributeId::Value, AttributeId::DataType] {
                ids.push(ReadValueId {
                    node_id: n.clone(),
                    attribute_id: attr as u32,
                    index_range: Default::default(),
                    data_encoding: QualifiedName::null(),
                });
            }
        }
        let values = session
            .read(&ids, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| OpcUaError::status("Read", e.status()))?;
        // The data types' browse names, in one more read.
        let type_ids: Vec<NodeId> = values
            .iter()
            .skip(1)
            .step_by(2)
            .map(|dv| match &dv.value {
                Some(Variant::NodeId(n)) => (**n).clone(),
                _ => NodeId::null(),
            })
            .collect();
        let names: Vec<ReadValueId> = type_ids
            .iter()
            .map(|n| ReadValueId {
                node_id: n.clone(),
                attribute_id: AttributeId::BrowseName as u32,
                index_range: Default::default(),
                data_encoding: QualifiedName::null(),
            })
            .collect();
        let type_names = session
            .read(&names, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| OpcUaError::status("Read", e.status()))?;
        for (i, n) in chunk.iter().enumerate() {
            let value = values.get(2 * i).and_then(|dv| dv.value.clone());
            let mut dtype = match type_names.get(i).and_then(|dv| dv.value.as_ref()) {
                Some(Variant::QualifiedName(q)) => q.name.as_ref().to_string(),
                _ => "?".into(),
            };
            if matches!(value, Some(Variant::Array(_))) {
                dtype.push_str("[]");
            }
            map.insert(n.clone(), (dtype, value));
        }
    }
    Ok(map)
}
