using System.Runtime.ExceptionServices;

namespace KernelLM.Runtime.Cpu;

/// <summary>A unit of data-parallel work: process items [begin, end) on worker <c>worker</c>.
/// Jobs are objects allocated once and re-armed with fields, so dispatching allocates nothing.</summary>
public abstract class ParallelJob
{
    public abstract void Execute(int begin, int end, int worker);
}

/// <summary>
/// A fixed set of worker threads that split a job's index range in chunks of <c>grain</c> items, the
/// caller's thread taking part. Unlike <c>Parallel.For</c> it allocates nothing per dispatch, which keeps
/// the decode loop allocation-free. Dispatches from different threads are serialised.
/// </summary>
public sealed class CpuWorkerPool : IDisposable
{
    private static readonly Lazy<CpuWorkerPool> s_shared = new(() => new CpuWorkerPool(Environment.ProcessorCount));

    private readonly Thread[] _threads;
    private readonly object _gate = new();
    private readonly object _dispatch = new();
    private ParallelJob? _job;
    private int _count;
    private int _grain;
    private int _next;
    private int _remaining;
    private long _generation;
    private volatile bool _disposed;
    private Exception? _error;

    public CpuWorkerPool(int threadCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threadCount, 1);
        _threads = new Thread[threadCount - 1];
        for (int i = 0; i < _threads.Length; i++)
        {
            int worker = i + 1;
            _threads[i] = new Thread(() => WorkerLoop(worker)) { IsBackground = true, Name = $"kernellm-cpu-{worker}" };
            _threads[i].Start();
        }
    }

    public static CpuWorkerPool Shared => s_shared.Value;

    /// <summary>Threads that execute a job, the caller included.</summary>
    public int ThreadCount => _threads.Length + 1;

    public void Run(ParallelJob job, int count, int grain)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (count <= 0)
        {
            return;
        }
        grain = Math.Max(1, grain);
        if (_threads.Length == 0 || count <= grain)
        {
            job.Execute(0, count, 0);
            return;
        }
        lock (_dispatch)
        {
            _job = job;
            _count = count;
            _grain = grain;
            _next = 0;
            _error = null;
            Volatile.Write(ref _remaining, _threads.Length);
            lock (_gate)
            {
                _generation++;
                Monitor.PulseAll(_gate);
            }
            Drain(0);
            var spin = new SpinWait();
            while (Volatile.Read(ref _remaining) != 0)
            {
                spin.SpinOnce(sleep1Threshold: -1);
            }
            _job = null;
            if (_error is { } error)
            {
                ExceptionDispatchInfo.Throw(error);
            }
        }
    }

    private void Drain(int worker)
    {
        var job = _job!;
        int count = _count;
        int grain = _grain;
        try
        {
            while (true)
            {
                int begin = Interlocked.Add(ref _next, grain) - grain;
                if (begin >= count)
                {
                    break;
                }
                job.Execute(begin, Math.Min(begin + grain, count), worker);
            }
        }
        catch (Exception error)
        {
            Interlocked.CompareExchange(ref _error, error, null);
        }
    }

    private void WorkerLoop(int worker)
    {
        long seen = 0;
        while (true)
        {
            // Spin briefly before sleeping: consecutive layers dispatch within microseconds of each other.
            for (int i = 0; i < 200 && Volatile.Read(ref _generation) == seen && !_disposed; i++)
            {
                Thread.SpinWait(30);
            }
            lock (_gate)
            {
                while (_generation == seen && !_disposed)
                {
                    Monitor.Wait(_gate);
                }
                if (_disposed)
                {
                    return;
                }
                seen = _generation;
            }
            Drain(worker);
            Interlocked.Decrement(ref _remaining);
        }
    }

    public void Dispose()
    {
        if (_disposed || ReferenceEquals(this, s_shared.IsValueCreated ? s_shared.Value : null))
        {
            return;
        }
        lock (_gate)
        {
            _disposed = true;
            Monitor.PulseAll(_gate);
        }
        foreach (var thread in _threads)
        {
            thread.Join();
        }
    }
}
