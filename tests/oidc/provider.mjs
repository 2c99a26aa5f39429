// A real OpenID provider for opsgate's tests: oidc-provider (OpenID Certified) on
// 127.0.0.1. Usage: node provider.mjs PORT KEY_ID
// Prints "ready ISSUER" on stdout once it listens. A fresh RSA key with KEY_ID signs
// everything, so restarting with another KEY_ID is a key rotation.
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const [port, keyId] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: keyId, use: 'sig', alg: 'RS256' };

// Who is in which group: the IdP's word, carried in the access token.
const GROUPS = { alice: ['sre'], dave: ['developer'], erin: ['sre-lead'] };
const RESOURCES = new Set(['urn:opsgate', 'urn:other-api']);

function claimsFor(accountId) {
  return { preferred_username: accountId, groups: GROUPS[accountId] ?? [] };
}

const provider = new Provider(issuer, {
  jwks: { keys: [jwk] },
  clients: [
    {
      client_id: 'opsgate-cli',
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    },
    {
      // The web console: a public client, authorization code with PKCE. Native, so the
      // loopback redirect URI matches on any port (RFC 8252 7.3): each test server
      // listens on a free port.
      client_id: 'opsgate-console',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/console/callback'],
    },
    {
      client_id: 'opsgate-ci',
      client_secret: 'ci-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
    {
      client_id: 'opsgate-short',
      client_secret: 'short-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, ...claimsFor(id) }),
  }),
  claims: { openid: ['sub'], profile: ['preferred_username'], groups: ['groups'] },
  scopes: ['openid', 'offline_access', 'profile', 'groups'],
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:opsgate',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => {
        if (!RESOURCES.has(resource)) throw new Error(`unknown resource ${resource}`);
        return {
          scope: 'openid profile groups',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: client.clientId === 'opsgate-short' ? 1 : 300,
        };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => {
    // A machine token (client credentials) names the client; a person's, the account.
    const who = token.accountId ?? token.clientId;
    return claimsFor(who);
  },
  pkce: { required: () => false },
});
provider.proxy = false;

const server = provider.listen(Number(port), '127.0.0.1', () => {
  process.stdout.write(`ready ${issuer}\n`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
