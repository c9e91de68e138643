// A Go client that talks to lxd-vsock-host the way the stock lxd-agent (Go)
// does, for tests/host_go_agent_test.ts: TLS from the config drive
// (agent.crt/agent.key, the host certificate from agent.conf pinned as LXD
// pins it: the only root, IsCA forced, server name = its first DNS name), and
// Go's net/http client with its keep-alive connection pool, dialing the
// daemon's hybrid-vsock path instead of AF_VSOCK.
//
//	go_agent <config drive dir> <unix socket> <request>...
//
// Each request is METHOD:PATH[:BODY]; one JSON line is printed per request:
// {"status":…,"body":…}. Ends with {"connections":N}: how many TCP-level
// connections Go opened (1 when keep-alive worked).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
)

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	dir, sock := os.Args[1], os.Args[2]
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "agent.crt"), filepath.Join(dir, "agent.key"))
	check(err)
	confData, err := os.ReadFile(filepath.Join(dir, "agent.conf"))
	check(err)
	var conf struct {
		Certificate string `json:"certificate"`
	}
	check(json.Unmarshal(confData, &conf))
	block, _ := pem.Decode([]byte(conf.Certificate))
	server, err := x509.ParseCertificate(block.Bytes)
	check(err)
	server.IsCA = true
	server.KeyUsage = x509.KeyUsageCertSign
	roots := x509.NewCertPool()
	roots.AddCert(server)
	config := &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      roots,
		MinVersion:   tls.VersionTLS12,
	}
	if len(server.DNSNames) > 0 {
		config.ServerName = server.DNSNames[0]
	}
	var dials int32
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: config,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			atomic.AddInt32(&dials, 1)
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	for _, spec := range os.Args[3:] {
		parts := strings.SplitN(spec, ":", 3)
		var body io.Reader
		if len(parts) == 3 {
			body = strings.NewReader(parts[2])
		}
		req, err := http.NewRequest(parts[0], "https://custom.socket"+parts[1], body)
		check(err)
		resp, err := client.Do(req)
		check(err)
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		check(err)
		line, _ := json.Marshal(map[string]any{"status": resp.StatusCode, "body": json.RawMessage(data)})
		fmt.Println(string(line))
	}
	line, _ := json.Marshal(map[string]any{"connections": atomic.LoadInt32(&dials)})
	fmt.Println(string(line))
}
