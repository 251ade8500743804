//! Who this proxy is to istiod (the xDS node, as ztunnel builds it) and the client's options.

use std::collections::BTreeMap;
use std::time::Duration;

use super::channel::Endpoint;
use super::proto::{string_value, Kind, ListValue, Node, Struct, Value};

/// Who this proxy is, for the xDS node (ztunnel reads the same variables).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// `INSTANCE_IP` (ztunnel's default 1.1.1.1 when unset).
    pub ip: Option<String>,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `NODE_NAME`.
    pub node_name: String,
    /// `ISTIO_META_*` (prefix removed), sent as strings.
    pub meta: BTreeMap<String, String>,
    /// `ISTIO_METAJSON_*` (prefix removed), sent as parsed JSON.
    pub meta_json: BTreeMap<String, serde_json::Value>,
}

impl NodeInfo {
    /// Picks the `ISTIO_META_*` and `ISTIO_METAJSON_*` variables out of an environment; a
    /// METAJSON value that is not JSON is logged and skipped, as ztunnel does.
    pub fn with_env_metadata(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        for (k, v) in vars {
            if let Some(k) = k.strip_prefix("ISTIO_METAJSON_") {
                match serde_json::from_str(&v) {
                    Ok(j) => {
                        self.meta_json.insert(k.to_owned(), j);
                    }
                    Err(e) => tracing::error!("ISTIO_METAJSON_{k}: not JSON ({e}); not sent"),
                }
            } else if let Some(k) = k.strip_prefix("ISTIO_META_") {
                self.meta.insert(k.to_owned(), v);
            }
        }
        self
    }

    /// The node as ztunnel sends it: id `ztunnel~IP~pod.ns~ns.svc.cluster.local`, metadata
    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, then `ISTIO_META_*`, `ISTIO_METAJSON_*`.
    pub fn node(&self) -> Node {
        let ip = self.ip.as_deref().unwrap_or("1.1.1.1");
        let (pod, ns) = (&self.pod_name, &self.pod_namespace);
        let mut fields = BTreeMap::new();
        for (k, v) in [
            ("NAME", pod.as_str()),
            ("NAMESPACE", ns.as_str()),
            ("INSTANCE_IPS", ip),
            ("NODE_NAME", self.node_name.as_str()),
        ] {
            fields.insert(k.to_owned(), string_value(v));
        }
        for (k, v) in &self.meta {
            fields.insert(k.clone(), string_value(v.clone()));
        }
        for (k, v) in &self.meta_json {
            fields.insert(k.clone(), json_value(v));
        }
        Node {
            id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            metadata: Some(Struct { fields }),
        }
    }
}

fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// Everything the xDS client needs.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// istiod (`XDS_ADDRESS`) and how to reach it.
    pub endpoint: Endpoint,
    /// Who this proxy is.
    pub node: NodeInfo,
    /// On-demand addresses (`XDS_ON_DEMAND`): how long a connection waits for istiod's answer;
    /// `None`: off, every address is subscribed to.
    pub on_demand: Option<Duration>,
}
