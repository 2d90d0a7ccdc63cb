// Throw-away X.509 credentials for TLS tests, made with GnuTLS's certificate API: a CA and, signed
// by it, a server certificate (for "localhost") and a client certificate, written in the layout of
// a tls-creds-x509 directory.
#pragma once

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <gtest/gtest.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>

namespace blockd::testing {

class TestPki {
 public:
  // Writes <dir>/server/{ca-cert,server-cert,server-key}.pem and
  // <dir>/client/{ca-cert,client-cert,client-key}.pem; `ca_name` tells unrelated CAs apart.
  TestPki(const std::string& dir, const std::string& ca_name) : dir_(dir) {
    std::filesystem::create_directories(server_dir());
    std::filesystem::create_directories(client_dir());
    Key ca_key;
    Cert ca;
    fill(ca, ca_key, "CN=" + ca_name, 1);
    EXPECT_EQ(gnutls_x509_crt_set_basic_constraints(ca.crt, 1, -1), 0);
    EXPECT_EQ(gnutls_x509_crt_set_key_usage(ca.crt, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN),
              0);
    EXPECT_EQ(gnutls_x509_crt_sign2(ca.crt, ca.crt, ca_key.key, GNUTLS_DIG_SHA256, 0), 0);
    const std::string ca_pem = pem(ca);
    write(server_dir() + "/ca-cert.pem", ca_pem);
    write(client_dir() + "/ca-cert.pem", ca_pem);
    leaf(ca, ca_key, "server", GNUTLS_KP_TLS_WWW_SERVER, 2);
    leaf(ca, ca_key, "client", GNUTLS_KP_TLS_WWW_CLIENT, 3);
  }

  std::string server_dir() const { return dir_ + "/server"; }
  std::string client_dir() const { return dir_ + "/client"; }

 private:
  struct Key {
    Key() {
      gnutls_x509_privkey_init(&key);
      EXPECT_EQ(gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA,
                                             GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0),
                0);
    }
    ~Key() { gnutls_x509_privkey_deinit(key); }
    gnutls_x509_privkey_t key;
  };
  struct Cert {
    Cert() { gnutls_x509_crt_init(&crt); }
    ~Cert() { gnutls_x509_crt_deinit(crt); }
    gnutls_x509_crt_t crt;
  };

  static void fill(Cert& cert, Key& key, const std::string& dn, unsigned char serial) {
    const time_t now = time(nullptr);
    const char* error = nullptr;
    EXPECT_EQ(gnutls_x509_crt_set_version(cert.crt, 3), 0);
    EXPECT_EQ(gnutls_x509_crt_set_serial(cert.crt, &serial, 1), 0);
    EXPECT_EQ(gnutls_x509_crt_set_activation_time(cert.crt, now - 3600), 0);
    EXPECT_EQ(gnutls_x509_crt_set_expiration_time(cert.crt, now + 86400), 0);
    EXPECT_EQ(gnutls_x509_crt_set_dn(cert.crt, dn.c_str(), &error), 0);
    EXPECT_EQ(gnutls_x509_crt_set_key(cert.crt, key.key), 0);
  }

  void leaf(Cert& ca, Key& ca_key, const std::string& role, const char* purpose,
            unsigned char serial) {
    Key key;
    Cert cert;
    fill(cert, key, "CN=localhost " + role, serial);
    EXPECT_EQ(gnutls_x509_crt_set_basic_constraints(cert.crt, 0, -1), 0);
    EXPECT_EQ(gnutls_x509_crt_set_key_usage(cert.crt, GNUTLS_KEY_DIGITAL_SIGNATURE), 0);
    EXPECT_EQ(gnutls_x509_crt_set_key_purpose_oid(cert.crt, purpose, 0), 0);
    EXPECT_EQ(gnutls_x509_crt_set_subject_alt_name(cert.crt, GNUTLS_SAN_DNSNAME, "localhost", 9,
                                                   GNUTLS_FSAN_SET),
              0);
    EXPECT_EQ(gnutls_x509_crt_sign2(cert.crt, ca.crt, ca_key.key, GNUTLS_DIG_SHA256, 0), 0);
    const std::string dir = dir_ + "/" + role;
    write(dir + "/" + role + "-cert.pem", pem(cert));
    gnutls_datum_t out{};
    EXPECT_EQ(gnutls_x509_privkey_export2(key.key, GNUTLS_X509_FMT_PEM, &out), 0);
    write(dir + "/" + role + "-key.pem", std::string(reinterpret_cast<char*>(out.data), out.size));
    gnutls_free(out.data);
  }

  static std::string pem(Cert& cert) {
    gnutls_datum_t out{};
    EXPECT_EQ(gnutls_x509_crt_export2(cert.crt, GNUTLS_X509_FMT_PEM, &out), 0);
    std::string text(reinterpret_cast<char*>(out.data), out.size);
    gnutls_free(out.data);
    return text;
  }

  static void write(const std::string& path, const std::string& text) {
    std::ofstream(path) << text;
  }

  std::string dir_;
};

}  // namespace blockd::testing
