// A Go net/http peer for shared/http/go_interop_test.ts: the stock lxd-agent
// and LXD are Go, so our codec and TLS must interoperate with Go's.
//
//	go_peer server <unix socket> <dir>   serves mutual TLS on the socket, prints "ready"
//	go_peer client <unix socket> <dir>   runs requests against a server, prints one JSON line each
//	go_peer forge-client <unix socket> <dir>   TLS client presenting client.crt signed with forged.key
//	go_peer forge-server <unix socket> <dir>   TLS server presenting server.crt signed with forged.key
//
// <dir> holds server.crt/key, client.crt/key and forged.key. Both sides pin the peer as
// LXD does: the peer certificate becomes the only root (IsCA forced), and the
// client uses the certificate's first DNS name as the TLS server name.
package main

import (
	"bufio"
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
)

func pool(path string) (*x509.CertPool, *x509.Certificate) {
	data, err := os.ReadFile(path)
	check(err)
	block, _ := pem.Decode(data)
	cert, err := x509.ParseCertificate(block.Bytes)
	check(err)
	cert.IsCA = true
	cert.KeyUsage = x509.KeyUsageCertSign
	p := x509.NewCertPool()
	p.AddCert(cert)
	return p, cert
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	mode, sock, dir := os.Args[1], os.Args[2], os.Args[3]
	switch mode {
	case "server":
		serve(sock, dir)
	case "client":
		client(sock, dir)
	case "forge-client", "forge-server":
		forge(mode, sock, dir)
	}
}

// forged pairs a certificate with a private key that does not match it; Go
// does not check this when the tls.Certificate is built by hand, so the
// handshake signature is made with the wrong key.
func forged(certPath, keyPath string) tls.Certificate {
	certPEM, err := os.ReadFile(certPath)
	check(err)
	keyPEM, err := os.ReadFile(keyPath)
	check(err)
	certBlock, _ := pem.Decode(certPEM)
	keyBlock, _ := pem.Decode(keyPEM)
	key, err := x509.ParsePKCS8PrivateKey(keyBlock.Bytes)
	check(err)
	return tls.Certificate{Certificate: [][]byte{certBlock.Bytes}, PrivateKey: key}
}

func forge(mode, sock, dir string) {
	config := &tls.Config{InsecureSkipVerify: true, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13}
	if mode == "forge-client" {
		config.Certificates = []tls.Certificate{forged(filepath.Join(dir, "client.crt"), filepath.Join(dir, "forged.key"))}
		conn, err := net.Dial("unix", sock)
		check(err)
		t := tls.Client(conn, config)
		err = t.Handshake()
		if err == nil {
			fmt.Fprintf(t, "GET /1.0 HTTP/1.1\r\nHost: lxd-vsock\r\n\r\n")
			var body []byte
			body, err = io.ReadAll(t)
			fmt.Printf("read %d bytes: %v\n", len(body), err)
		} else {
			fmt.Printf("handshake: %v\n", err)
		}
		return
	}
	config.Certificates = []tls.Certificate{forged(filepath.Join(dir, "server.crt"), filepath.Join(dir, "forged.key"))}
	os.Remove(sock)
	listener, err := net.Listen("unix", sock)
	check(err)
	fmt.Println("ready")
	conn, err := listener.Accept()
	check(err)
	err = tls.Server(conn, config).Handshake()
	fmt.Printf("handshake: %v\n", err)
}

func serve(sock, dir string) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"))
	check(err)
	clients, _ := pool(filepath.Join(dir, "client.crt"))
	config := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clients,
		MinVersion:   tls.VersionTLS13,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/1.0", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{
			"type": "sync", "status": "Success", "status_code": 200, "operation": "",
			"error_code": 0, "error": "", "metadata": map[string]any{
				"method": r.Method, "body": string(body), "te": r.TransferEncoding,
				"length": r.ContentLength, "host": r.Host,
			},
		})
	})
	mux.HandleFunc("/1.0/events", func(w http.ResponseWriter, r *http.Request) {
		flusher := w.(http.Flusher)
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "{\"n\":%d}\n", i)
			flusher.Flush()
		}
	})
	os.Remove(sock)
	listener, err := net.Listen("unix", sock)
	check(err)
	fmt.Println("ready")
	server := &http.Server{Handler: mux}
	server.Serve(tls.NewListener(listener, config))
}

func client(sock, dir string) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key"))
	check(err)
	roots, server := pool(filepath.Join(dir, "server.crt"))
	config := &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      roots,
		ServerName:   server.DNSNames[0],
		MinVersion:   tls.VersionTLS13,
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
		TLSClientConfig: config,
	}
	c := &http.Client{Transport: transport}
	report := func(name string, resp *http.Response, err error) {
		out := map[string]any{"name": name}
		if err != nil {
			out["error"] = err.Error()
		} else {
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			out["status"] = resp.StatusCode
			out["body"] = string(body)
			out["te"] = resp.TransferEncoding
			out["length"] = resp.ContentLength
			if err != nil {
				out["error"] = err.Error()
			}
		}
		line, _ := json.Marshal(out)
		fmt.Println(string(line))
	}
	resp, err := c.Get("https://lxd-vsock/1.0")
	report("get", resp, err)
	resp, err = c.Get("https://lxd-vsock/1.0") // the same kept-alive connection
	report("get-again", resp, err)
	resp, err = c.Post("https://lxd-vsock/1.0", "application/json", strings.NewReader(`{"state":"Ready"}`))
	report("post-length", resp, err)
	reader, writer := io.Pipe()
	go func() { writer.Write([]byte("chunked ")); writer.Write([]byte("body")); writer.Close() }()
	resp, err = c.Post("https://lxd-vsock/1.0", "text/plain", reader)
	report("post-chunked", resp, err)
	resp, err = c.Get("https://lxd-vsock/1.0/events")
	if err == nil {
		lines := bufio.NewScanner(resp.Body)
		var got []string
		for i := 0; i < 2 && lines.Scan(); i++ {
			got = append(got, lines.Text())
		}
		resp.Body.Close()
		line, _ := json.Marshal(map[string]any{"name": "events", "status": resp.StatusCode, "body": strings.Join(got, "|"), "te": resp.TransferEncoding})
		fmt.Println(string(line))
	} else {
		report("events", nil, err)
	}
	resp, err = c.Get("https://lxd-vsock/missing")
	report("missing", resp, err)
}
