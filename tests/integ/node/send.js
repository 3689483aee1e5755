// Send raw messages to sluice with nodemailer, one connection each.
//   node send.js PORT starttls|implicit FILE...
// Prints one JSON line per file: {"file", "ok", "response" | "error"}.
// Exits 77 when nodemailer is not installed (tools/install-deps --test).
'use strict';
const fs = require('fs');
const path = require('path');

let nodemailer;
try {
    nodemailer = require(path.join(__dirname, 'node_modules', 'nodemailer'));
} catch (e) {
    console.log('SKIP: nodemailer not installed in ' + __dirname + ' (tools/install-deps --test)');
    process.exit(77);
}

async function main() {
    const [port, mode, ...files] = process.argv.slice(2);
    let failed = 0;
    for (const file of files) {
        const transport = nodemailer.createTransport({
            host: '127.0.0.1',
            port: Number(port),
            secure: mode === 'implicit',
            requireTLS: mode !== 'implicit',
            tls: { rejectUnauthorized: false },
            // Longer than sluice's timeout_data in the tests: a hang shows
            // as sluice's 421, not as a client timeout.
            socketTimeout: 300000,
            greetingTimeout: 30000,
        });
        try {
            const info = await transport.sendMail({
                envelope: { from: 'alice@example.com', to: ['bob@example.org'] },
                raw: fs.readFileSync(file),
            });
            console.log(JSON.stringify({ file, ok: true, response: info.response }));
        } catch (e) {
            failed++;
            console.log(JSON.stringify({ file, ok: false, error: String(e && e.message) }));
        }
        transport.close();
    }
    process.exit(failed ? 1 : 0);
}

main();
