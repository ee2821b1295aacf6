// The OpenID Provider the tests log in with: panva's oidc-provider (OpenID
// Certified), configured as a hospital's identity provider would be for the
// appliance.  tests/oidcprovider.py writes the settings and runs this file:
//
//     node tests/oidc/provider.mjs SETTINGS.json
//
// SETTINGS.json:
//
//     {
//       "port": 8443,                           127.0.0.1 only
//       "issuer": "https://localhost:8443",
//       "tls": {"certificate": "server.pem", "key": "server.key"},
//       "keys": [JWK, ...],                     private JWKs; the first signs, all are published
//       "cookieKeys": ["..."],
//       "resource": "https://pacs.test/",       audience of the JWT access tokens
//       "ttl": {"accessToken": 300, "idToken": 300, "session": 3600},
//       "clients": [{"client_id", "client_secret", "redirect_uris",
//                    "post_logout_redirect_uris", "access_token_ttl"?}, ...],
//       "users": [{"sub", "username", "password", "groups", "email", "name"}, ...]
//     }
//
// Clients and users are read from the file again whenever it changes, so that
// the fixture adds them without a restart; the rest is read once.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';

import Provider, { errors } from 'oidc-provider';
// Sessions, grants and codes stay in the library's own memory store; only
// clients come from the settings file (see SettingsAdapter).  The package is
// pinned to an exact version, so this path inside it is stable.
import MemoryAdapter from 'oidc-provider/lib/adapters/memory_adapter.js';

const settingsPath = process.argv[2];
if (!settingsPath) {
  console.error('usage: node provider.mjs SETTINGS.json');
  process.exit(2);
}

let cached = { mtimeMs: -1, settings: undefined };
function settings() {
  const { mtimeMs } = fs.statSync(settingsPath);
  if (mtimeMs !== cached.mtimeMs) {
    cached = { mtimeMs, settings: JSON.parse(fs.readFileSync(settingsPath, 'utf8')) };
  }
  return cached.settings;
}

const initial = settings();
const signingKey = initial.keys[0];

function userBySub(sub) {
  return settings().users.find((user) => user.sub === sub);
}

function userByName(username) {
  return settings().users.find((user) => user.username === username);
}

function clientSettings(clientId) {
  return settings().clients.find((client) => client.client_id === clientId);
}

// Constant time, so that a test of the appliance never depends on how fast a
// wrong password is refused.
function samePassword(given, expected) {
  const a = crypto.createHash('sha256').update(String(given)).digest();
  const b = crypto.createHash('sha256').update(String(expected)).digest();
  return crypto.timingSafeEqual(a, b);
}

// Clients live in the settings file rather than in the configuration's static
// list: the fixture registers one per appliance test, and a static list would
// need a restart (losing every session) each time.
class SettingsClients {
  async find(id) {
    const client = clientSettings(id);
    if (!client) return undefined;
    // access_token_ttl is ours (getResourceServerInfo), not client metadata.
    const { access_token_ttl: _, ...metadata } = client;
    return metadata;
  }

  async upsert() { throw new Error('clients are registered through the settings file'); }

  async destroy() {}
}

function SettingsAdapter(name) {
  return name === 'Client' ? new SettingsClients() : new MemoryAdapter(name);
}

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body>
<h1>${escapeHtml(title)}</h1>
${body}
</body>
</html>
`;
}

function loginPage(uid, { error, login = '' } = {}) {
  return page('Sign in to the test hospital', `${error ? `<p id="error" role="alert">${escapeHtml(error)}</p>\n` : ''}\
<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label>User name <input id="login" name="login" value="${escapeHtml(login)}" required autofocus></label>
<label>Password <input id="password" name="password" type="password" required></label>
<button id="submit" type="submit">Sign in</button>
</form>`);
}

const configuration = {
  adapter: SettingsAdapter,

  async findAccount(ctx, sub) {
    const user = userBySub(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        // The library keeps only what the granted scopes cover (claims below).
        return {
          sub,
          name: user.name ?? user.username,
          preferred_username: user.username,
          email: user.email,
          email_verified: true,
          groups: [...user.groups],
        };
      },
    };
  },

  jwks: { keys: initial.keys },
  cookies: {
    keys: initial.cookieKeys,
    long: { signed: true },
    short: { signed: true },
  },

  // groups comes with "profile" (what the appliance asks for by default) and
  // with a scope of its own, as providers that have a "groups" scope do.
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'groups'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  // OIDC Core puts the scopes' claims only in the UserInfo response (unless
  // response_type=id_token); the appliance reads groups from the ID token.
  conformIdTokenClaims: false,

  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  clientDefaults: {
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
  },

  pkce: {
    methods: ['S256'],
    required: () => true,
  },

  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      // The library always asks the signed-in End-User to confirm an
      // RP-initiated logout.  The page submits its own form (a browser needs
      // no click); a client without JavaScript posts the form: the button
      // #logout with name=logout value=yes, and the hidden xsrf field.
      async logoutSource(ctx, form) {
        ctx.body = page('Sign out', `${form}
<button id="logout" type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button>
<script>document.getElementById('logout').click();</script>`);
      },
      async postLogoutSuccessSource(ctx) {
        ctx.body = page('Signed out', '<p id="signed-out">You are signed out.</p>');
      },
    },
    resourceIndicators: {
      enabled: true,
      // A plain authorization code flow (no resource parameter) yields an
      // access token for the PACS, as with providers that have a default
      // audience per client.
      async defaultResource(ctx, client, oneOf) {
        return oneOf ?? initial.resource;
      },
      // Without this, a code flow with scope openid gets an opaque token for
      // the UserInfo endpoint instead of the granted resource's JWT.
      async useGrantedResource() {
        return true;
      },
      async getResourceServerInfo(ctx, resourceIndicator, client) {
        if (resourceIndicator !== initial.resource) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: '',
          audience: initial.resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: clientSettings(client.clientId)?.access_token_ttl ?? initial.ttl.accessToken,
          jwt: { sign: { alg: 'RS256', kid: signingKey.kid } },
        };
      },
    },
  },

  async extraTokenClaims(ctx, token) {
    if (token.kind !== 'AccessToken') return undefined;
    const user = userBySub(token.accountId);
    if (!user) return undefined;
    return { preferred_username: user.username, groups: [...user.groups] };
  },

  // Consent is not asked: the appliance is the hospital's own application.
  // The login interaction below grants what was requested.
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },

  ttl: {
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? initial.ttl.accessToken,
    IdToken: initial.ttl.idToken,
    Session: initial.ttl.session,
    Grant: initial.ttl.session,
    Interaction: 600,
    AuthorizationCode: 60,
  },

  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<pre id="error">${escapeHtml(JSON.stringify(out, null, 2))}</pre>`);
  },
};

const provider = new Provider(initial.issuer, configuration);

for (const event of [
  'server_error', 'authorization.error', 'grant.error', 'end_session.error', 'userinfo.error',
  'jwks.error', 'discovery.error', 'introspection.error', 'revocation.error',
]) {
  provider.on(event, (ctx, error) => {
    console.error(`${event}: ${error?.name}: ${error?.message}${error?.error_description ? ` (${error.error_description})` : ''}`);
  });
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function grantRequested(details) {
  const { prompt, params, session, grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
  if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const saved = await grant.save();
  return grantId ? {} : { grantId: saved };
}

// The interactions: /interaction/UID (GET: the login form, or the consent
// granted at once) and /interaction/UID/login (POST: the credentials).
async function interaction(req, res, path) {
  const [, , uid, action] = path.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    return send(res, 400, page('Error', '<p id="error">This sign-in is not the current one.</p>'));
  }
  if (req.method === 'GET' && action === undefined) {
    console.log(`interaction ${uid}: ${details.prompt.name} (${details.prompt.reasons.join(', ')})`);
    if (details.prompt.name === 'login') {
      return send(res, 200, loginPage(uid));
    }
    if (details.prompt.name === 'consent') {
      const consent = await grantRequested(details);
      return provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
    }
    return send(res, 400, page('Error', `<p id="error">Unexpected prompt ${escapeHtml(details.prompt.name)}</p>`));
  }
  if (req.method === 'POST' && action === 'login' && details.prompt.name === 'login') {
    const form = await readForm(req);
    const login = form.get('login') ?? '';
    const user = userByName(login);
    // Compared even for an unknown user, so both refusals take the same time.
    const matches = samePassword(form.get('password') ?? '', user ? user.password : crypto.randomUUID());
    if (!user || !matches) {
      console.log(`login refused for ${JSON.stringify(login)}`);
      return send(res, 200, loginPage(uid, { error: 'Invalid user name or password.', login }));
    }
    console.log(`login of ${user.username}`);
    return provider.interactionFinished(req, res, {
      login: { accountId: user.sub, amr: ['pwd'], remember: false },
    }, { mergeWithLastSubmission: false });
  }
  return send(res, 405, page('Error', '<p id="error">Method not allowed</p>'));
}

const callback = provider.callback();

const server = https.createServer({
  cert: fs.readFileSync(initial.tls.certificate),
  key: fs.readFileSync(initial.tls.key),
}, (req, res) => {
  const started = process.hrtime.bigint();
  res.on('finish', () => {
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    console.log(`${req.method} ${req.url.split('?')[0]} ${res.statusCode} ${ms.toFixed(1)}ms`);
  });
  const path = new URL(req.url, initial.issuer).pathname;
  if (path.startsWith('/interaction/')) {
    interaction(req, res, path).catch((error) => {
      const expired = error instanceof errors.SessionNotFound;
      if (!expired) console.error('interaction error:', error);
      if (!res.headersSent) {
        send(res, expired ? 400 : 500, page('Error', `<p id="error">${escapeHtml(error.message)}</p>`));
      }
    });
    return;
  }
  callback(req, res);
});

server.listen(initial.port, '127.0.0.1', () => {
  console.log(`listening on ${initial.issuer} (signing key ${signingKey.kid}, resource ${initial.resource})`);
});

// The fixture holds our stdin open: a test run that dies without stopping
// us (SIGKILL, a crash) leaves no provider behind on its port.
process.stdin.on('end', () => {
  console.log('stdin closed: stopping');
  process.exit(0);
});
process.stdin.resume();

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    console.log(`${signal}: stopping`);
    process.exit(0);
  });
}
