// dh-streaming-interop drives Deckhand's streaming server with upstream's client (client-go
// remotecommand and portforward, as kubectl and crictl use them) and serves upstream's CRI
// streaming server (k8s.io/kubernetes/pkg/kubelet/cri/streaming) for Deckhand's client.
// hack/build-streaming-interop.sh builds it inside Debian's kubernetes source tree (vendored,
// offline); streaming/tests/interop_go.rs runs it.
//
//	exec URL [-stdin] [-stdout] [-stderr] [-tty]   stdio are the process's own; exits with the
//	                                               remote exit code, 125 on any other error
//	portforward URL PORT                           forwards 127.0.0.1:<random> to PORT; prints
//	                                               "listening <port>", runs until stdin closes
//	serve                                          upstream's server on 127.0.0.1:0; stdin lines
//	                                               "exec TTY STDIN STDOUT STDERR SCRIPT..." (runs
//	                                               sh -c SCRIPT) or "portforward" print a URL
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	utilexec "k8s.io/client-go/util/exec"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1alpha2"
	"k8s.io/kubernetes/pkg/kubelet/cri/streaming"
)

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "dh-streaming-interop: "+format+"\n", args...)
	os.Exit(125)
}

func main() {
	if len(os.Args) < 2 {
		die("usage: exec URL [flags] | portforward URL PORT | serve")
	}
	switch os.Args[1] {
	case "exec":
		doExec(os.Args[2:])
	case "portforward":
		doPortForward(os.Args[2:])
	case "serve":
		doServe()
	default:
		die("unknown mode %q", os.Args[1])
	}
}

func doExec(args []string) {
	if len(args) < 1 {
		die("exec needs a URL")
	}
	u, err := url.Parse(args[0])
	if err != nil {
		die("url: %v", err)
	}
	fs := flag.NewFlagSet("exec", flag.ExitOnError)
	stdin := fs.Bool("stdin", false, "")
	stdout := fs.Bool("stdout", false, "")
	stderr := fs.Bool("stderr", false, "")
	tty := fs.Bool("tty", false, "")
	fs.Parse(args[1:])
	executor, err := remotecommand.NewSPDYExecutor(&rest.Config{}, "POST", u)
	if err != nil {
		die("executor: %v", err)
	}
	opts := remotecommand.StreamOptions{Tty: *tty}
	if *stdin {
		opts.Stdin = os.Stdin
	}
	if *stdout {
		opts.Stdout = os.Stdout
	}
	if *stderr {
		opts.Stderr = os.Stderr
	}
	if *tty {
		opts.TerminalSizeQueue = &fixedSize{sizes: []remotecommand.TerminalSize{{Width: 111, Height: 33}}}
	}
	err = executor.Stream(opts)
	if err == nil {
		os.Exit(0)
	}
	if ee, ok := err.(utilexec.ExitError); ok {
		os.Exit(ee.ExitStatus())
	}
	die("stream: %v", err)
}

// fixedSize hands out its sizes once, then blocks for ever (as a terminal that never resizes).
type fixedSize struct{ sizes []remotecommand.TerminalSize }

func (f *fixedSize) Next() *remotecommand.TerminalSize {
	if len(f.sizes) == 0 {
		select {}
	}
	s := f.sizes[0]
	f.sizes = f.sizes[1:]
	return &s
}

func doPortForward(args []string) {
	if len(args) != 2 {
		die("portforward needs URL PORT")
	}
	u, err := url.Parse(args[0])
	if err != nil {
		die("url: %v", err)
	}
	transport, upgrader, err := spdy.RoundTripperFor(&rest.Config{})
	if err != nil {
		die("round tripper: %v", err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, "POST", u)
	stop := make(chan struct{})
	ready := make(chan struct{})
	pf, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:" + args[1]}, stop, ready, ioutil.Discard, os.Stderr)
	if err != nil {
		die("port forward: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		die("forward: %v", err)
	}
	ports, err := pf.GetPorts()
	if err != nil || len(ports) != 1 {
		die("ports: %v %v", ports, err)
	}
	fmt.Printf("listening %d\n", ports[0].Local)
	io.Copy(ioutil.Discard, os.Stdin)
	close(stop)
	<-done
}

// processRuntime runs exec'd commands as local processes and forwards ports on loopback.
type processRuntime struct{}

func (processRuntime) Exec(containerID string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	c := exec.Command(cmd[0], cmd[1:]...)
	if in != nil {
		c.Stdin = in
	}
	if out != nil {
		c.Stdout = out
	}
	if errw != nil {
		c.Stderr = errw
	}
	if resize != nil {
		go func() {
			for range resize {
			}
		}()
	}
	err := c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return utilexec.CodeExitError{Err: ee, Code: ee.ExitCode()}
	}
	return err
}

func (processRuntime) Attach(containerID string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	return fmt.Errorf("attach is not supported by this test runtime")
}

func (processRuntime) PortForward(podSandboxID string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return err
	}
	defer conn.Close()
	errs := make(chan error, 2)
	go func() {
		_, err := io.Copy(conn, stream)
		conn.(*net.TCPConn).CloseWrite()
		errs <- err
	}()
	go func() {
		_, err := io.Copy(stream, conn)
		errs <- err
	}()
	<-errs
	<-errs
	return nil
}

func doServe() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		die("listen: %v", err)
	}
	addr := l.Addr().String()
	l.Close()
	config := streaming.DefaultConfig
	config.Addr = addr
	config.StreamCreationTimeout = 30 * time.Second
	srv, err := streaming.NewServer(config, processRuntime{})
	if err != nil {
		die("server: %v", err)
	}
	go func() {
		if err := srv.Start(true); err != nil {
			die("serve: %v", err)
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		var u string
		switch {
		case f[0] == "exec" && len(f) >= 6:
			b := func(s string) bool { v, _ := strconv.ParseBool(s); return v }
			resp, err := srv.GetExec(&runtimeapi.ExecRequest{ContainerId: "dh-go", Cmd: []string{"sh", "-c", strings.Join(f[5:], " ")}, Tty: b(f[1]), Stdin: b(f[2]), Stdout: b(f[3]), Stderr: b(f[4])})
			if err != nil {
				u = "error " + err.Error()
			} else {
				u = resp.Url
			}
		case f[0] == "portforward":
			resp, err := srv.GetPortForward(&runtimeapi.PortForwardRequest{PodSandboxId: "dh-go"})
			if err != nil {
				u = "error " + err.Error()
			} else {
				u = resp.Url
			}
		default:
			u = "error bad command"
		}
		fmt.Println(u)
	}
	srv.Stop()
}
