// TLS credentials: what a tls-creds-x509 or tls-creds-psk object holds (QEMU's
// TlsCredsX509Properties, TlsCredsPskProperties).
//
// A credentials object is loaded once from the files of a directory and then shared, read-only,
// by every TLS session that uses it (sessions keep it alive with a shared_ptr, so deleting the
// object does not disturb the connections and servers using it, as in QEMU). Any thread may use a
// loaded object; loading happens on the control (main) loop.
#pragma once

#include <memory>
#include <string>

#include "runtime/status.h"

struct gnutls_certificate_credentials_st;
struct gnutls_psk_server_credentials_st;
struct gnutls_psk_client_credentials_st;

namespace blockd::tls {

enum class Endpoint { kServer, kClient };

struct X509Options {
  std::string dir;
  Endpoint endpoint = Endpoint::kClient;
  bool verify_peer = true;
  // A GnuTLS priority string; empty for GnuTLS's default. Checked when a session starts.
  std::string priority;
  // Parse the endpoint's own certificate before loading anything, so that a broken one is named
  // as such (QEMU's sanity-check; its further checks of dates and key usage are not made).
  bool sanity_check = true;
};

struct PskOptions {
  std::string dir;  // holds keys.psk: one "username:hex key" a line
  Endpoint endpoint = Endpoint::kClient;
  std::string username;  // client only; empty for QEMU's default, "qemu"
  std::string priority;  // as X509Options::priority; PSK key exchanges are added to it
};

class Credentials {
 public:
  enum class Kind { kX509, kPsk };

  // Loads the X.509 files of `options.dir`: ca-cert.pem (always), ca-crl.pem (when present), and
  // server-cert.pem + server-key.pem for a server, client-cert.pem + client-key.pem for a client
  // (optional there: a client without them presents no certificate). Errors (GenericError), as
  // qemu-storage-daemon words them:
  //   "Missing 'dir' property value"
  //   "Unable to access credentials <path>: <strerror>"
  //   "Unable to import server certificate <path>: <GnuTLS message>" (client likewise)
  //   "Unable to import CA certificate list <path>"
  //   "Cannot load certificate '<cert>' & key '<key>': <GnuTLS message>"
  static Expected<std::shared_ptr<Credentials>> load_x509(const X509Options& options);
  // Loads <dir>/keys.psk: every key for a server; the key of `username` for a client. Errors
  // (GenericError), as qemu-storage-daemon words them:
  //   "Missing 'dir' property value", "username should not be set when endpoint=server",
  //   "Unable to access credentials <path>: <strerror>",
  //   "Username <name> not found in PSK file <path>"
  static Expected<std::shared_ptr<Credentials>> load_psk(const PskOptions& options);

  ~Credentials();
  Credentials(const Credentials&) = delete;
  Credentials& operator=(const Credentials&) = delete;

  Endpoint endpoint() const noexcept { return options_.endpoint; }
  bool verify_peer() const noexcept { return options_.verify_peer; }
  const std::string& priority() const noexcept { return options_.priority; }
  const std::string& dir() const noexcept { return options_.dir; }
  Kind kind() const noexcept { return kind_; }
  // The GnuTLS credentials (of kind(), for endpoint()); owned by this object.
  gnutls_certificate_credentials_st* certificates() const noexcept { return certificates_; }
  gnutls_psk_server_credentials_st* psk_server() const noexcept { return psk_server_; }
  gnutls_psk_client_credentials_st* psk_client() const noexcept { return psk_client_; }

 private:
  Credentials(Kind kind, const X509Options& options) : kind_(kind), options_(options) {}
  Kind kind_;
  X509Options options_;  // for PSK: dir, endpoint and priority (verify_peer has no meaning)
  gnutls_certificate_credentials_st* certificates_ = nullptr;
  gnutls_psk_server_credentials_st* psk_server_ = nullptr;
  gnutls_psk_client_credentials_st* psk_client_ = nullptr;
};

}  // namespace blockd::tls
