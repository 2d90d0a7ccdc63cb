// Loading X.509 credentials from a directory, with the file names and error texts that
// qemu-storage-daemon uses for its tls-creds-x509 objects.
#include "tls/credentials.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

namespace blockd::tls {
namespace {

// The path of `name` in `dir`, or an error when it cannot be read. A missing optional file gives
// an empty path.
Expected<std::string> credential_file(const std::string& dir, const char* name, bool required) {
  std::string path = dir + "/" + name;
  if (::access(path.c_str(), R_OK) == 0) return path;
  const int error = errno;
  if (!required && error == ENOENT) return std::string();
  return Status::generic("Unable to access credentials " + path + ": " + std::strerror(error));
}

// Parses the (first) PEM certificate in `path`; GnuTLS's reason when it cannot.
Status parse_certificate(const std::string& path, const char* role) {
  gnutls_datum_t contents{};
  int result = gnutls_load_file(path.c_str(), &contents);
  if (result >= 0) {
    gnutls_x509_crt_t certificate;
    result = gnutls_x509_crt_init(&certificate);
    if (result >= 0) {
      result = gnutls_x509_crt_import(certificate, &contents, GNUTLS_X509_FMT_PEM);
      gnutls_x509_crt_deinit(certificate);
    }
    gnutls_free(contents.data);
  }
  if (result >= 0) return Status::ok();
  return Status::generic(std::string("Unable to import ") + role + " certificate " + path + ": " +
                         gnutls_strerror(result));
}

}  // namespace

Credentials::~Credentials() {
  if (certificates_ != nullptr) gnutls_certificate_free_credentials(certificates_);
  if (psk_server_ != nullptr) gnutls_psk_free_server_credentials(psk_server_);
  if (psk_client_ != nullptr) gnutls_psk_free_client_credentials(psk_client_);
}

Expected<std::shared_ptr<Credentials>> Credentials::load_x509(const X509Options& options) {
  if (options.dir.empty()) return Status::generic("Missing 'dir' property value");
  const bool server = options.endpoint == Endpoint::kServer;
  auto ca = credential_file(options.dir, "ca-cert.pem", true);
  if (!ca) return ca.status();
  auto crl = credential_file(options.dir, "ca-crl.pem", false);
  if (!crl) return crl.status();
  auto cert = credential_file(options.dir, server ? "server-cert.pem" : "client-cert.pem", server);
  if (!cert) return cert.status();
  // A client's key is needed only with its certificate.
  auto key = credential_file(options.dir, server ? "server-key.pem" : "client-key.pem",
                             server || !cert->empty());
  if (!key) return key.status();

  if (options.sanity_check && !cert->empty()) {
    Status parsed = parse_certificate(*cert, server ? "server" : "client");
    if (!parsed.is_ok()) return parsed;
  }

  std::shared_ptr<Credentials> loaded(new Credentials(Kind::kX509, options));
  if (gnutls_certificate_allocate_credentials(&loaded->certificates_) != GNUTLS_E_SUCCESS) {
    return Status::generic("Cannot allocate TLS credentials");
  }
  // GnuTLS counts the certificates it took: a file without any is as bad as an unreadable one.
  if (gnutls_certificate_set_x509_trust_file(loaded->certificates_, ca->c_str(),
                                             GNUTLS_X509_FMT_PEM) <= 0) {
    return Status::generic("Unable to import CA certificate list " + *ca);
  }
  if (!crl->empty() && gnutls_certificate_set_x509_crl_file(loaded->certificates_, crl->c_str(),
                                                            GNUTLS_X509_FMT_PEM) < 0) {
    return Status::generic("Unable to import CA certificate revocation list " + *crl);
  }
  if (!cert->empty()) {
    const int result = gnutls_certificate_set_x509_key_file(loaded->certificates_, cert->c_str(),
                                                            key->c_str(), GNUTLS_X509_FMT_PEM);
    if (result < 0) {
      return Status::generic("Cannot load certificate '" + *cert + "' & key '" + *key +
                             "': " + gnutls_strerror(result));
    }
  }
  return loaded;
}

Expected<std::shared_ptr<Credentials>> Credentials::load_psk(const PskOptions& options) {
  if (options.dir.empty()) return Status::generic("Missing 'dir' property value");
  const bool server = options.endpoint == Endpoint::kServer;
  if (server && !options.username.empty()) {
    return Status::generic("username should not be set when endpoint=server");
  }
  auto keys = credential_file(options.dir, "keys.psk", true);
  if (!keys) return keys.status();
  X509Options common;
  common.dir = options.dir;
  common.endpoint = options.endpoint;
  common.verify_peer = false;
  common.priority = options.priority;
  std::shared_ptr<Credentials> loaded(new Credentials(Kind::kPsk, common));
  if (server) {
    if (gnutls_psk_allocate_server_credentials(&loaded->psk_server_) != GNUTLS_E_SUCCESS) {
      return Status::generic("Cannot allocate TLS credentials");
    }
    // GnuTLS reads the file when a client names its user.
    const int result = gnutls_psk_set_server_credentials_file(loaded->psk_server_, keys->c_str());
    if (result < 0) {
      return Status::generic("Cannot set PSK server credentials: " +
                             std::string(gnutls_strerror(result)));
    }
    return loaded;
  }
  const std::string username = options.username.empty() ? "qemu" : options.username;
  std::ifstream file(*keys);
  std::string line;
  std::string key;
  bool found = false;
  while (std::getline(file, line)) {
    const size_t colon = line.find(':');
    if (colon != std::string::npos && line.compare(0, colon, username) == 0 &&
        colon == username.size()) {
      key = line.substr(colon + 1);
      found = true;
      break;
    }
  }
  if (!found) {
    return Status::generic("Username " + username + " not found in PSK file " + *keys);
  }
  if (gnutls_psk_allocate_client_credentials(&loaded->psk_client_) != GNUTLS_E_SUCCESS) {
    return Status::generic("Cannot allocate TLS credentials");
  }
  gnutls_datum_t datum{reinterpret_cast<unsigned char*>(key.data()),
                       static_cast<unsigned>(key.size())};
  const int result = gnutls_psk_set_client_credentials(loaded->psk_client_, username.c_str(),
                                                       &datum, GNUTLS_PSK_KEY_HEX);
  if (result < 0) {
    return Status::generic("Cannot set PSK client credentials: " +
                           std::string(gnutls_strerror(result)));
  }
  return loaded;
}

}  // namespace blockd::tls
