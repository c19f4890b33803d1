"""zc.buildout recipe ``zeoraid:server``: a zeoraid server in a buildout.

Mirrors ``zc.zodbrecipes:server`` (see doc/DEPLOYMENT.md)::

    [zeoraid]
    recipe = zeoraid[recipe]:server
    zeoraid.conf =          (or zeo.conf, as for zc.zodbrecipes)
      %import zeoraid
      <zeo>
        address 127.0.0.1:8100
      </zeo>
      <raidstorage 1>
        <zeoclient zeo1>
          server 127.0.0.1:8101
        </zeoclient>
        ...
      </raidstorage>
    deployment = deployment     (optional: a zc.recipe.deployment part)
    shell-script = false        (true: bin/PART is a /bin/sh script)
    eggs =                      (optional: more eggs for the server)

It writes the server configuration (with a pid file, a ``<runner>``, an
``<eventlog>`` and each ``<raidstorage>``'s ``state-file`` filled in where
missing), a server script
``parts/PART/zeoraid``, the control script ``bin/PART`` (start, stop,
restart, fg, status, logtail, pid, kill, reopen_transcript: zdaemon
through zeoraid-manager's process control) and, per ``<raidstorage>``,
``bin/PART-STORAGE-manage``: zeoraid-manager with ``-C`` and ``-S`` set.
With ``deployment``, the configuration goes to the deployment's etc
directory, pid file, admin and zdaemon sockets to its run directory, the
transcript log to its log directory, the state files to its lib
directory (/var/lib/NAME), the control script to its
rc-directory (as DEPLOYMENT-PART) and a logrotate file is written.
"""
import io
import logging
import os
import subprocess
import sys

import zc.buildout
import zc.buildout.easy_install
import ZConfig.schemaless


logger = logging.getLogger('zeoraid.recipe')

#: Sections of a server configuration that are not storages.
NON_STORAGE = ('zeo', 'eventlog', 'runner', 'zeoraid', 'metrics')

#: Generated scripts export their sys.path, so that the processes they
#: start (``python -m zdaemon``, the daemon manager, the server) import
#: the same eggs as the script itself.
INITIALIZATION = ("import os\n"
                  "os.environ['PYTHONPATH'] = os.pathsep.join(\n"
                  "    p for p in sys.path if p)\n")


class Server:
    """The ``zeoraid:server`` recipe."""

    def __init__(self, buildout, name, options):
        import zc.recipe.egg
        self.buildout = buildout
        self.name = options.get('name', name)
        self.options = options
        bindir = buildout['buildout']['bin-directory']
        options['location'] = os.path.join(
            buildout['buildout']['parts-directory'], name)
        options['bin-directory'] = bindir
        deployment = self.deployment = options.get('deployment')
        if deployment:
            section = buildout[deployment]
            options['deployment-name'] = section.get('name', deployment)
            for key in ('rc-directory', 'run-directory', 'log-directory',
                        'etc-directory', 'crontab-directory', 'user'):
                options[key] = section[key]
            # Backend states must outlive a reboot: /var/lib, not /run.
            options['lib-directory'] = section.get(
                'lib-directory', section['run-directory'])
            logrotate = options.get('logrotate',
                                    section.get('logrotate', ''))
            if logrotate.lower() == 'false':
                options['logrotate'] = ''
            else:
                options['logrotate'] = os.path.join(
                    section['logrotate-directory'],
                    options['deployment-name'] + '-' + self.name)
        else:
            options['rc-directory'] = bindir
            for key in ('run-directory', 'log-directory', 'etc-directory',
                        'lib-directory'):
                options[key] = options['location']
        options['zeopack'] = os.path.join(
            bindir, options.get('zeopack', 'zeopack'))
        if options.get('shell-script', '') not in ('true', 'false', ''):
            raise zc.buildout.UserError(
                'The shell-script option value must be "true", "false"'
                ' or "".')
        if 'zeoraid.conf' not in options and 'zeo.conf' not in options:
            raise zc.buildout.UserError(
                'part %s: the zeoraid.conf option (the server'
                ' configuration) is missing' % name)
        options['eggs'] = options.get('eggs', '') + '\nzeoraid\nzdaemon'
        options['scripts'] = ''     # only the scripts made below
        self.egg = zc.recipe.egg.Egg(buildout, name, options)

    # paths

    def _paths(self):
        options = self.options
        if self.deployment:
            prefix = self.name + '-'
            rc = options['deployment-name'] + '-' + self.name
        else:
            prefix = ''
            rc = self.name
        return dict(
            conf=os.path.join(options['etc-directory'],
                              prefix + 'zeoraid.conf'),
            pid=os.path.join(options['run-directory'],
                             prefix + 'zeoraid.pid'),
            socket=os.path.join(options['run-directory'],
                                prefix + 'zdaemon.sock'),
            transcript=os.path.join(options['log-directory'],
                                    prefix + 'zeoraid.log'),
            state=os.path.join(options['lib-directory'],
                               prefix + 'zeoraid-%s.state'),
            server=os.path.join(options['location'], 'zeoraid'),
            ctl=os.path.join(options['location'], 'zeoraidctl'),
            rc=os.path.join(options['rc-directory'], rc),
        )

    def _parse(self):
        text = self.options.get('zeoraid.conf',
                                self.options.get('zeo.conf', '')) + '\n'
        try:
            return ZConfig.schemaless.loadConfigFile(io.StringIO(text))
        except NotImplementedError as e:
            raise zc.buildout.UserError(
                'part %s: %s in the server configuration; use buildout'
                ' substitutions (${part:option}) instead' % (self.name, e))
        except ZConfig.ConfigurationSyntaxError as e:
            raise zc.buildout.UserError('%s in:\n%s' % (e, text))

    def configuration(self, paths):
        """The server configuration text and the RAID storage names."""
        conf = self._parse()
        zeo = [s for s in conf.sections if s.type == 'zeo']
        if len(zeo) != 1:
            raise zc.buildout.UserError(
                'part %s: the server configuration needs exactly one'
                ' <zeo> section' % self.name)
        zeo = zeo[0]
        if 'address' not in zeo:
            raise zc.buildout.UserError('part %s: no ZEO address'
                                        % self.name)
        if 'zeoraid' not in conf.imports:
            conf.imports = ['zeoraid'] + list(conf.imports)
        raids = [s.name or '1' for s in conf.sections
                 if s.type == 'raidstorage']
        if not raids:
            raise zc.buildout.UserError(
                'part %s: the server configuration has no <raidstorage>'
                ' section' % self.name)
        if 'pid-filename' not in zeo:
            zeo['pid-filename'] = [paths['pid']]
        for section in conf.sections:
            if section.type == 'raidstorage' and 'state-file' not in section:
                section['state-file'] = [paths['state'] % (
                    section.name or '1')]
        runner = [s for s in conf.sections if s.type == 'runner']
        if runner:
            runner = runner[0]
        else:
            runner = ZConfig.schemaless.Section('runner')
            conf.sections.append(runner)
        defaults = {
            'program': '%s -C %s' % (paths['server'], paths['conf']),
            'daemon': 'on',
            'directory': self.options['run-directory'],
            'socket-name': paths['socket'],
            'transcript': paths['transcript'],
        }
        if self.deployment:
            defaults['user'] = self.options['user']
        for key, value in defaults.items():
            if key not in runner:
                runner[key] = [value]
        if not [s for s in conf.sections if s.type == 'eventlog']:
            conf.sections.append(ZConfig.schemaless.Section(
                'eventlog', '', None, [ZConfig.schemaless.Section(
                    'logfile', '', dict(path=['STDOUT']))]))
        return str(conf), raids, zeo['address'][0]

    # install

    def install(self):
        options = self.options
        paths = self._paths()
        location = options['location']
        for directory in (location, options['etc-directory'],
                          options['run-directory'],
                          options['log-directory'],
                          options['lib-directory']):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        options.created(location)
        text, raids, address = self.configuration(paths)
        with open(paths['conf'], 'w') as f:
            f.write(text)
        if self.deployment:
            options.created(paths['conf'])

        requirements, ws = self.egg.working_set()
        executable = options['executable']

        def script(path, module, func, arguments):
            return zc.buildout.easy_install.scripts(
                [(os.path.basename(path), module, func)], ws, executable,
                os.path.dirname(path), arguments=arguments,
                initialization=INITIALIZATION)

        created = script(paths['server'], 'zeoraid.server', 'main', '')
        if options.get('shell-script') == 'true':
            created += script(paths['ctl'], 'zeoraid.recipe', 'control',
                              '%r, sys.argv[1:]' % paths['conf'])
            command = '%s "$@"' % paths['ctl']
            if options.get('user'):
                command = 'su %s -c "%s $*"' % (options['user'],
                                                paths['ctl'])
            else:
                command = 'exec ' + command
            with open(paths['rc'], 'w') as f:
                f.write('#!/bin/sh\n%s\n' % command)
            os.chmod(paths['rc'], 0o755)
            created.append(paths['rc'])
        else:
            created += script(paths['rc'], 'zeoraid.recipe', 'control',
                              '%r, sys.argv[1:]' % paths['conf'])
        for storage in raids:
            manage = os.path.join(options['bin-directory'], '%s-%s-manage'
                                  % (self.name, storage))
            created += script(manage, 'zeoraid.manager.cli', 'main',
                              '[%r, %r, %r, %r] + sys.argv[1:]'
                              % ('-C', paths['conf'], '-S', storage))
        options.created(*created)

        if self.deployment and options['logrotate']:
            with open(options['logrotate'], 'w') as f:
                f.write(LOGROTATE % dict(logfile=paths['transcript'],
                                         rc=paths['rc']))
            options.created(options['logrotate'])
        pack = options.get('pack')
        if pack:
            options.created(self._pack(pack.split(), raids, address))
        return options.created()

    update = install

    def _pack(self, pack, raids, address):
        """A crontab file that packs every RAID through the server."""
        options = self.options
        if not self.deployment:
            raise zc.buildout.UserError('part %s: pack needs deployment'
                                        % self.name)
        if not 5 <= len(pack) <= 7:
            raise zc.buildout.UserError(
                'part %s: pack is 5 crontab fields, then optionally days'
                ' and a MAILTO address' % self.name)
        if ':' in address:
            host, port = address.rsplit(':', 1)
            target = '-h %s -p %s' % (host or '127.0.0.1', port)
        else:
            target = '-U ' + address
        path = os.path.join(options['crontab-directory'], 'pack-%s-%s'
                            % (options['deployment-name'], self.name))
        lines = []
        if len(pack) == 7:
            lines.append('MAILTO=%s' % pack.pop())
        days = pack.pop() if len(pack) == 6 else '1'
        for storage in raids:
            lines.append('%s %s %s %s -S %s -d %s' % (
                ' '.join(pack), options['user'], options['zeopack'], target,
                storage, days))
        with open(path, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        return path


LOGROTATE = """%(logfile)s {
  rotate 5
  weekly
  postrotate
    %(rc)s reopen_transcript
    %(rc)s kill USR2
  endscript
}
"""

CONTROL_USAGE = """\
Usage: %(prog)s COMMAND

Process control of this zeoraid server (zdaemon), like zopectl:
  start      start the server as a daemon; wait until it answers
  stop       stop it (SIGTERM, clean shutdown)
  restart    stop and start it
  fg         run it in the foreground
  status     is the daemon running? (exit 0 yes, 3 no)
  pid        print the server's pid
  logtail    follow the log
  kill [SIG] send a signal (HUP reloads the backends, USR2 reopens logs)
  reopen_transcript   reopen zdaemon's transcript log (log rotation)
Other commands go to zeoraid-manager (details, recover NAME, ...); the
%(prog)s-STORAGE-manage scripts address one RAID storage each.
"""


def control(config, args):
    """bin/PART: zdaemon process control of the server in ``config``."""
    from zeoraid.manager import cli
    prog = os.path.basename(sys.argv[0]) if sys.argv else 'zeoraid'
    if not args or args[0] in ('help', '-h', '--help'):
        sys.stdout.write(CONTROL_USAGE % dict(prog=prog))
        return 0 if args else 2
    command = args[0]
    if command in ('status', 'reopen_transcript'):
        # zdaemon's own answer: is the process running?
        from zeoraid.server import ServerSettings
        from zeoraid.server import load_configuration
        settings = ServerSettings(load_configuration(config), config)
        env = dict(os.environ)
        env.pop('DAEMON_MANAGER_MODE', None)
        return subprocess.call(cli.zdaemon_command(settings) + [command],
                               env=env)
    if command == 'foreground':
        command = 'fg'
    return cli.main(['-C', config, command] + list(args[1:]))
