/**
 * x509 certificates for the NBD TLS tests, made with openssl in a fresh directory: a CA, a server
 * certificate for 127.0.0.1 / localhost, a client certificate, and a second CA with a client
 * certificate of its own (one a server trusting only the first CA must refuse). The file names are
 * the ones libnbd (`tls-certificates=DIR`), qemu (`tls-creds-x509,dir=DIR`) and nbdkit expect, so
 * the directory can be handed to real clients as it is. Test support only: imported by tests.
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface TestCertificates {
  /** Holds ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem. */
  readonly directory: string;
  /** Holds ca-cert.pem (the real CA) with a client-cert.pem / client-key.pem signed by another CA. */
  readonly strangerDirectory: string;
  readonly caFile: string;
  readonly serverCertFile: string;
  readonly serverKeyFile: string;
  readonly ca: Buffer;
  readonly clientCert: Buffer;
  readonly clientKey: Buffer;
  readonly strangerCert: Buffer;
  readonly strangerKey: Buffer;
}

function openssl(args: readonly string[], cwd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('openssl', args, { cwd, timeout: 30_000 }, (error, _stdout, stderr) => {
      if (error !== null) reject(new Error(`openssl ${args.join(' ')} failed (install the openssl package): ${stderr || error.message}`));
      else resolve();
    });
  });
}

/** A key and a certificate for `subject` signed by the CA in `caPrefix`-cert.pem / -key.pem. */
async function signed(directory: string, name: string, subject: string, caPrefix: string, extensions: string): Promise<void> {
  await openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', subject], directory);
  await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${caPrefix}-cert.pem`, '-CAkey', `${caPrefix}-key.pem`, '-CAcreateserial',
    '-days', '2', '-out', `${name}-cert.pem`, '-extfile', extensions], directory);
}

export async function makeTestCertificates(directory: string): Promise<TestCertificates> {
  const stranger = join(directory, 'stranger');
  await mkdir(stranger, { recursive: true });
  for (const [dir, prefix] of [[directory, 'ca'], [stranger, 'other-ca']] as const) {
    await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${prefix}-key.pem`, '-out', `${prefix}-cert.pem`,
      '-days', '2', '-subj', `/CN=Shale test ${prefix}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
  }
  await writeFile(join(directory, 'server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n');
  await writeFile(join(directory, 'client.ext'), 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n');
  await writeFile(join(stranger, 'client.ext'), 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n');
  await signed(directory, 'server', '/CN=localhost', 'ca', 'server.ext');
  await signed(directory, 'client', '/CN=shale-test-client', 'ca', 'client.ext');
  await signed(stranger, 'client', '/CN=stranger', 'other-ca', 'client.ext');
  // The stranger trusts the real CA (so it accepts the server) but its own certificate is not from it.
  await copyFile(join(directory, 'ca-cert.pem'), join(stranger, 'ca-cert.pem'));
  return {
    directory,
    strangerDirectory: stranger,
    caFile: join(directory, 'ca-cert.pem'),
    serverCertFile: join(directory, 'server-cert.pem'),
    serverKeyFile: join(directory, 'server-key.pem'),
    ca: await readFile(join(directory, 'ca-cert.pem')),
    clientCert: await readFile(join(directory, 'client-cert.pem')),
    clientKey: await readFile(join(directory, 'client-key.pem')),
    strangerCert: await readFile(join(stranger, 'client-cert.pem')),
    strangerKey: await readFile(join(stranger, 'client-key.pem')),
  };
}
