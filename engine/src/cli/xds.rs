//! `ringtun run`'s control-plane flags, under ztunnel's environment variable names, and the
//! [`XdsOptions`] they make.

use clap::Args;

use crate::xds::channel::DEFAULT_ROOT_PATH;
use crate::xds::{Endpoint, NodeInfo, RootCert, Token, XdsOptions};
use crate::EngineError;

/// Where istiod is and who this proxy is to it.
#[derive(Args, Debug, Clone, Default)]
pub struct XdsArgs {
    /// istiod's address (`https://host:port`). When set and not empty, workloads, services and
    /// policies come from istiod over Delta xDS instead of --config (LOCAL_XDS_PATH).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// istiod's root certificate: a PEM file, or the PEM text itself (ztunnel's reading).
    #[arg(long, env = "XDS_ROOT_CA", default_value = DEFAULT_ROOT_PATH)]
    pub xds_root_ca: String,
    /// A name istiod's certificate may carry instead of the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// The pod's token, sent as `authorization: Bearer …`: a file (read at each connection) or
    /// the token itself; by default ./var/run/secrets/tokens/istio-token when it exists.
    #[arg(long, env = "AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// This pod's IP, in the xDS node id (ztunnel's default 1.1.1.1).
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<String>,
    /// This pod's name, in the xDS node id and metadata.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// This pod's namespace, in the xDS node id and metadata.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
}

impl XdsArgs {
    /// The client's options, or `None` when XDS_ADDRESS is unset or empty (local config).
    pub(super) fn options(
        &self,
        cluster_id: &str,
        node_name: Option<&str>,
        mark: u32,
    ) -> Result<Option<XdsOptions>, EngineError> {
        let url = self.xds_address.as_deref().map(str::trim).unwrap_or("");
        if url.is_empty() {
            return Ok(None);
        }
        let node = NodeInfo {
            ip: self.instance_ip.clone(),
            pod_name: self.pod_name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            node_name: node_name.unwrap_or_default().to_owned(),
            ..Default::default()
        }
        .with_env_metadata(std::env::vars());
        let endpoint = Endpoint {
            url: url.to_owned(),
            root: RootCert::from_setting(&self.xds_root_ca),
            alt_hostname: self.alt_xds_hostname.clone(),
            token: Token::from_setting(self.auth_token.as_deref()),
            cluster_id: cluster_id.to_owned(),
            mark,
        };
        endpoint
            .check()
            .map_err(|e| EngineError::Usage(format!("XDS_ADDRESS (--xds-address): {e}")))?;
        Ok(Some(XdsOptions { endpoint, node }))
    }
}
