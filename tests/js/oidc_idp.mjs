// A real OpenID Connect identity provider for the viewer/console sign-in test
// (tests/integration/test_viewer_oidc.py): panva's oidc-provider (npm, pinned in package.json) with its own
// login form, one public client for fedgate (authorization code + PKCE), and RS256 JWT access tokens for
// fedgate's resource indicator carrying the users' groups and purpose of use.
//
//   node oidc_idp.mjs PORT REDIRECT_URI RESOURCE
// prints "ready ISSUER" on stdout once it listens. Users (any password): the login is the account id; its
// claims come from USERS below (an unknown login gets no groups).
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';

const [port, redirectUri, resource] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;

const USERS = {
  'dr-alice': { groups: ['fedgate-clinicians'], purpose: 'treatment' },
  'ana-lyst': { groups: ['fedgate-analysts'], purpose: { codes: ['DUO:0000042'] } },
};

const key = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'fedgate-viewer', token_endpoint_auth_method: 'none', redirect_uris: [redirectUri],
    grant_types: ['authorization_code'], response_types: ['code'],
  }],
  jwks: { keys: [{ ...key, kid: randomUUID(), alg: 'RS256', use: 'sig' }] },
  cookies: { keys: [randomUUID()] },
  pkce: { required: () => true },
  claims: { openid: ['sub'], profile: ['name'] },
  async findAccount(ctx, id) {
    return { accountId: id, async claims() { return { sub: id, name: id }; } };
  },
  // first-party client: no consent screen (the grant covers what it asked for)
  async loadExistingGrant(ctx) {
    const { oidc } = ctx;
    const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
    if (grantId) {
      const grant = await oidc.provider.Grant.find(grantId);
      if (grant) return grant;
    }
    const grant = new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
    grant.addOIDCScope('openid profile');
    grant.addResourceScope(resource, 'fedgate');
    await grant.save();
    return grant;
  },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== resource) throw new Error('unknown resource');
        return { scope: 'fedgate', audience: resource, accessTokenTTL: 600, accessTokenFormat: 'jwt',
                 jwt: { sign: { alg: 'RS256' } } };
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    const user = USERS[token.accountId];
    return user ? { groups: user.groups, purpose: user.purpose } : undefined;
  },
});
provider.proxy = false;
provider.listen(Number(port), '127.0.0.1', () => { console.log(`ready ${issuer}`); });
